#!/bin/sh
# coi test image: what sessions need (user code, tmux, sudo, /workspace) plus
# the stand-in agent. Works on the coi image and on the bare Debian base.
set -eu
export DEBIAN_FRONTEND=noninteractive
need=""
for cmd in tmux python3 sudo git; do command -v "$cmd" >/dev/null || need="$need $cmd"; done
# ssh-add: the SSH agent forwarding tests list the forwarded agent's keys from inside.
command -v ssh-add >/dev/null || need="$need openssh-client"
if [ -n "$need" ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends $need
  apt-get clean
  rm -rf /var/lib/apt/lists/*
fi
if ! id code >/dev/null 2>&1; then
  groupadd --gid 1000 code
  useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash code
  echo 'code ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/code
  chmod 0440 /etc/sudoers.d/code
fi
mkdir -p /workspace
chown code:code /workspace
# A supplementary group of code's (as docker and sudo are in the coi image): the
# tests check that every process coi starts as code has it.
getent group coi-extra >/dev/null || groupadd coi-extra
usermod -aG coi-extra code
