#!/bin/bash
# Start sshd in this container for DeepSpeed's multi-node launcher (pdsh over ssh):
#
#   start-sshd                # sshd in the background on port ${SSH_PORT:-2222}
#   start-sshd -D             # in the foreground (as a container's main process)
#
# The image has no ssh host keys: this makes the container's own on first use (ssh-keygen -A),
# so no two containers share a private host key. Authorised keys come from the user:
# mount a public key into /root/.ssh/authorized_keys (docker/README.md).
set -euo pipefail
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
chmod 700 /root/.ssh 2>/dev/null || true
exec /usr/sbin/sshd -p "${SSH_PORT:-2222}" "$@"
