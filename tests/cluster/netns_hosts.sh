#!/bin/bash
# Two emulated cluster nodes on this machine, for the deepspeed launcher's multi-node path.
#
#   tests/cluster/netns_hosts.sh up STATE_DIR     # (re)creates both nodes; idempotent
#   tests/cluster/netns_hosts.sh down STATE_DIR   # removes everything `up` made
#   tests/cluster/netns_hosts.sh exec N CMD...    # runs CMD on node N (1 or 2)
#
# Node N (N = 1, 2) is
#   - a network namespace "mpnodeN" with loopback up and one end of a veth pair named "mpeth0"
#     (the same interface name on both nodes, as eth0/ib0 on a real cluster) holding
#     10.77.0.N/24; the pair joins only the two namespaces, so no traffic leaves them;
#   - its own /etc/hosts and /etc/ssh: `ip netns exec` bind-mounts /etc/netns/mpnodeN/{hosts,ssh}
#     over /etc/{hosts,ssh} for everything started in the node; the machine's own files are
#     untouched. hosts names mpnode1 and mpnode2; ssh holds the node's sshd_config and host key,
#     a client ssh_config (the test key, the known host keys, no writes to ~/.ssh) and
#     authorized_keys with the test key (made here, for root, key login only);
#   - sshd on port $NETNS_SSH_PORT (2222) as PID 1 of its own PID and UTS namespace (hostname
#     mpnodeN): what runs on a node sees only that node's processes, as on a real host (the
#     launcher's `pkill -f` on one node cannot reach the other), and when that sshd dies every
#     process of the node dies with it, so `down` cannot leak a process.
#
# STATE_DIR gets the test key (id_ed25519), sshd logs and the PIDs to stop; `down` deletes it.
set -euo pipefail

PORT=${NETNS_SSH_PORT:-2222}
SUBNET=10.77.0
NODES=(1 2)
IFACE=mpeth0

ns() { echo "mpnode$1"; }

die() { echo "netns_hosts: $*" >&2; exit 2; }

down() {
    local state=$1 n name pid
    for n in "${NODES[@]}"; do
        name=$(ns "$n")
        if [ -f "$state/sshd$n.pid" ]; then  # the `unshare` holding the node's PID namespace
            pid=$(cat "$state/sshd$n.pid")
            # unshare ignores SIGTERM while it waits; its death SIGKILLs sshd (--kill-child), the
            # PID namespace's init, and with it every process of the node
            kill -KILL "$pid" 2>/dev/null || true
            # gone, or a zombie waiting for the machine's init
            for _ in $(seq 50); do
                [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo Z)" = Z ] && break
                sleep 0.1
            done
        fi
        if ip netns list 2>/dev/null | grep -qw "^$name"; then
            # anything still inside the network namespace (its PID namespace dies with sshd)
            for pid in $(ip netns pids "$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            for _ in $(seq 50); do [ -z "$(ip netns pids "$name" 2>/dev/null)" ] && break; sleep 0.1; done
            ip netns delete "$name"
        fi
        rm -rf "/etc/netns/$name"
    done
    rmdir /etc/netns 2>/dev/null || true
    rm -rf "$state"
}

write_node_files() {  # $1 node, $2 state dir
    local n=$1 state=$2 name etc m
    name=$(ns "$n")
    etc=/etc/netns/$name
    mkdir -p "$etc/ssh"
    chmod 755 "$etc" "$etc/ssh"
    {
        echo "127.0.0.1 localhost"
        for m in "${NODES[@]}"; do echo "$SUBNET.$m $(ns "$m")"; done
    } > "$etc/hosts"
    ssh-keygen -q -t ed25519 -N '' -C "$name host key" -f "$etc/ssh/ssh_host_ed25519_key"
    cp "$state/id_ed25519" "$state/id_ed25519.pub" "$etc/ssh/"
    cp "$state/id_ed25519.pub" "$etc/ssh/authorized_keys"
    chmod 600 "$etc/ssh/id_ed25519" "$etc/ssh/authorized_keys"
    cat > "$etc/ssh/sshd_config" <<EOF
# sshd of emulated node $name (tests/cluster/netns_hosts.sh)
Port $PORT
ListenAddress $SUBNET.$n
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile /etc/ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PidFile none
PrintMotd no
EOF
    cat > "$etc/ssh/ssh_config" <<EOF
# ssh client of emulated node $name: the test key, the nodes' host keys, nothing under ~/.ssh
Host *
    IdentityFile /etc/ssh/id_ed25519
    IdentitiesOnly yes
    GlobalKnownHostsFile /etc/ssh/ssh_known_hosts
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 10
EOF
}

up() {
    local state=$1 n m name
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces, sshd)"
    [ -x /usr/sbin/sshd ] || die "no /usr/sbin/sshd: run tests/cluster/netns_prereqs.sh (openssh-server)"
    down "$state"
    mkdir -p "$state"
    chmod 700 "$state"
    ssh-keygen -q -t ed25519 -N '' -C "megaponder netns test key" -f "$state/id_ed25519"
    for n in "${NODES[@]}"; do
        name=$(ns "$n")
        ip netns add "$name"
        ip -n "$name" link set lo up
        write_node_files "$n" "$state"
    done
    # one veth pair, one end in each namespace (it never exists in the machine's namespace)
    ip link add "$IFACE" netns "$(ns 1)" type veth peer name "$IFACE" netns "$(ns 2)"
    for n in "${NODES[@]}"; do
        ip -n "$(ns "$n")" addr add "$SUBNET.$n/24" dev "$IFACE"
        ip -n "$(ns "$n")" link set "$IFACE" up
    done
    # every node knows every node's host key, under its name and address
    for n in "${NODES[@]}"; do
        for m in "${NODES[@]}"; do
            echo "[$(ns "$m")]:$PORT,[$SUBNET.$m]:$PORT $(cut -d' ' -f1,2 "/etc/netns/$(ns "$m")/ssh/ssh_host_ed25519_key.pub")"
        done > "/etc/netns/$(ns "$n")/ssh/ssh_known_hosts"
    done
    mkdir -p /run/sshd  # sshd's privilege-separation directory
    for n in "${NODES[@]}"; do
        name=$(ns "$n")
        setsid ip netns exec "$name" unshare --pid --fork --mount-proc --uts --kill-child=SIGKILL \
            sh -c "hostname $name && exec /usr/sbin/sshd -D -e -f /etc/ssh/sshd_config" \
            > "$state/sshd$n.log" 2>&1 < /dev/null &
        echo $! > "$state/sshd$n.pid"
    done
    # ready when node 1 logs in to both nodes
    for _ in $(seq 100); do
        if ip netns exec "$(ns 1)" ssh -p "$PORT" "$(ns 2)" true 2>/dev/null \
           && ip netns exec "$(ns 1)" ssh -p "$PORT" "$(ns 1)" true 2>/dev/null; then
            echo "netns_hosts: up: $(ns 1)=$SUBNET.1 $(ns 2)=$SUBNET.2, sshd port $PORT, state $state"
            return 0
        fi
        sleep 0.1
    done
    cat "$state"/sshd*.log >&2 || true
    down "$state"
    die "sshd on the emulated nodes did not accept the test key within 10 s"
}

cmd=${1:-}
case "$cmd" in
    up) up "${2:?usage: netns_hosts.sh up STATE_DIR}" ;;
    down) down "${2:?usage: netns_hosts.sh down STATE_DIR}" ;;
    exec) n=${2:?usage: netns_hosts.sh exec N CMD...}; shift 2; exec ip netns exec "$(ns "$n")" "$@" ;;
    *) die "usage: netns_hosts.sh up|down STATE_DIR, or exec N CMD..." ;;
esac
