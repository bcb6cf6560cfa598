#!/bin/bash
# Installs what tests/cluster/test_multinode.py needs on a Debian machine, as root:
# openssh-server (one sshd per emulated node) and pdsh (the deepspeed launcher's multi-node
# path). Idempotent: does nothing when both are present. Exit 0 also when it cannot install
# (not root, no apt-get): the tests then skip with one line saying what is missing.
set -u
need=()
command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "netns_prereqs: cannot install ${need[*]} (needs root and apt-get); the netns tests will skip" >&2
    exit 0
fi
# the Debian package's postinst would start sshd through systemd/init.d on port 22: keep the
# machine's services as they are (policy-rc.d 101 = "do not start")
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
{ apt-get install -y --no-install-recommends "${need[@]}" \
  || { apt-get update -qq && apt-get install -y --no-install-recommends "${need[@]}"; }; } >&2 \
  || echo "netns_prereqs: apt-get install ${need[*]} failed; the netns tests will skip" >&2
[ "$created_policy" = 1 ] && rm -f "$policy"
exit 0
