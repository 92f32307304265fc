#!/bin/bash
# Build steps of the coi image, run as root inside the builder container by
# coi.images.build_coi, one step per call:  coi-image.sh STEP
#
# Environment (set by coi): CODE_UID (uid and gid of user code), COI_TOOLS
# (agent tools, space-separated: claude codex gemini opencode aider).
# Every step can run again on a half-built system without harm.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
: "${CODE_UID:=1000}" "${COI_TOOLS:=claude}"

apt_install() {
  apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "$@"
}

step_packages() {
  # dpkg's fsync after every file makes a build minutes slower; a builder that
  # dies half-way is thrown away anyway. Removed again in the cleanup step.
  echo 'force-unsafe-io' > /etc/dpkg/dpkg.cfg.d/coi-build-unsafe-io
  apt-get update -q
  apt_install ca-certificates tmux bash git curl wget jq unzip openssh-client \
    build-essential python3 python3-pip python3-venv sudo less procps iproute2 \
    iptables xz-utils
  # Extra CA certificates that coi copied from the host (a TLS-inspecting
  # proxy in front of the package registries, for example).
  update-ca-certificates
  # pip inside virtual environments (pipx, python3 -m venv) uses its own CA
  # list unless told otherwise; point it at the system's.
  [ -e /etc/pip.conf ] || printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
}

step_nodejs() {
  apt_install nodejs npm
  # Node.js keeps its own list of CAs; make it use the system's too, so the
  # certificates trusted above count for npm and the agents as well.
  grep -q '^NODE_EXTRA_CA_CERTS=' /etc/environment 2>/dev/null \
    || echo 'NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' >> /etc/environment
  echo 'export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' > /etc/profile.d/coi-node-ca.sh
  npm config --global set cafile /etc/ssl/certs/ca-certificates.crt
  npm config --global set fund false
  npm config --global set audit false
  npm config --global set update-notifier false
}

step_gh() {
  apt_install gh
}

step_docker() {
  apt_install docker.io containerd runc
  systemctl enable docker.service containerd.service >/dev/null 2>&1 || true
}

step_user() {
  # Images from other distributions ship their own user at uid 1000
  # (ubuntu's "ubuntu"): make room for code.
  local other
  other=$(getent passwd "$CODE_UID" | cut -d: -f1 || true)
  if [ -n "$other" ] && [ "$other" != code ]; then
    userdel --remove "$other" 2>/dev/null || userdel "$other"
  fi
  other=$(getent group "$CODE_UID" | cut -d: -f1 || true)
  if [ -n "$other" ] && [ "$other" != code ]; then
    groupdel "$other"
  fi
  getent group code >/dev/null || groupadd --gid "$CODE_UID" code
  if ! getent passwd code >/dev/null; then
    useradd --uid "$CODE_UID" --gid "$CODE_UID" --create-home --home-dir /home/code \
      --shell /bin/bash code
  fi
  getent group docker >/dev/null || groupadd --system docker
  usermod -aG sudo,docker code
  printf 'code ALL=(ALL) NOPASSWD:ALL\n' > /etc/sudoers.d/coi-code
  chmod 0440 /etc/sudoers.d/coi-code
  visudo -cf /etc/sudoers.d/coi-code
  install -d -o code -g code -m 0755 /workspace
  install -d -o code -g code -m 0700 /home/code/.claude
  chown code:code /home/code
}

step_power() {
  # poweroff, shutdown and reboot for user code: as code they go through
  # sudo (no password), as root straight to systemd. /usr/local/bin comes
  # first on code's PATH and on sudo's secure_path.
  local cmd real
  for cmd in poweroff shutdown reboot halt; do
    real=$(PATH=/usr/sbin:/sbin:/usr/bin:/bin command -v "$cmd")
    cat > "/usr/local/bin/$cmd" <<EOF
#!/bin/sh
# coi: lets user code end the session from inside the container.
if [ "\$(id -u)" != 0 ]; then
  exec sudo -n /usr/local/bin/$cmd "\$@"
fi
exec $real "\$@"
EOF
    chmod 0755 "/usr/local/bin/$cmd"
  done
}

npm_package() {
  case "$1" in
    claude) echo '@anthropic-ai/claude-code' ;;
    codex) echo '@openai/codex' ;;
    gemini) echo '@google/gemini-cli' ;;
    opencode) echo 'opencode-ai' ;;
    *) echo '' ;;
  esac
}

step_tools() {
  local tool package
  for tool in $COI_TOOLS; do
    case "$tool" in
      aider)
        apt_install pipx
        PIPX_HOME=/opt/pipx PIPX_BIN_DIR=/usr/local/bin pipx install --force aider-chat
        ;;
      *)
        package=$(npm_package "$tool")
        if [ -z "$package" ]; then
          echo "unknown agent tool: $tool" >&2
          exit 2
        fi
        (cd /tmp && npm install --global --no-audit --no-fund "$package")
        ;;
    esac
    case "$tool" in
      claude)
        # npm installs the native binary for both C libraries (about 400 MB
        # each); bin/claude.exe is the glibc one, so the musl build is dead weight.
        if [ ! -e /lib/ld-musl-x86_64.so.1 ] && [ ! -e /lib/ld-musl-aarch64.so.1 ]; then
          find "$(npm root --global)/$(npm_package "$tool")" -depth -type d -path '*/node_modules/*-musl' \
            -exec rm -rf {} +
        fi
        ;;
    esac
  done
}

step_verify() {
  # Each tool runs, as user code, from a login shell (code's real PATH).
  local checks=(
    "tmux -V" "bash --version" "git --version" "curl --version" "wget --version"
    "jq --version" "unzip -v" "ssh -V" "gcc --version" "make --version"
    "python3 --version" "pip --version" "python3 -m venv --help" "node --version"
    "npm --version" "gh --version" "docker --version" "sudo -n true"
    "test -s /etc/ssl/certs/ca-certificates.crt"
  )
  local tool
  for tool in $COI_TOOLS; do
    checks+=("$tool --version")
  done
  local check failed=0
  for check in "${checks[@]}"; do
    if out=$(runuser -l code -c "$check" 2>&1 </dev/null); then
      printf 'ok    %-45s %s\n' "$check" "$(printf '%s\n' "$out" | head -n1)"
    else
      printf 'FAIL  %-45s %s\n' "$check" "$(printf '%s\n' "$out" | tail -n3 | tr '\n' ' ')"
      failed=1
    fi
  done
  # The Docker daemon answers code without sudo (docker group).
  if out=$(runuser -l code -c 'docker info --format "{{.ServerVersion}} {{.Driver}}"' 2>&1); then
    printf 'ok    %-45s %s\n' "docker info (as code)" "$out"
  else
    printf 'FAIL  %-45s %s\n' "docker info (as code)" "$(printf '%s\n' "$out" | tail -n3 | tr '\n' ' ')"
    failed=1
  fi
  return "$failed"
}

step_cleanup() {
  rm -f /etc/dpkg/dpkg.cfg.d/coi-build-unsafe-io
  apt-get clean
  rm -rf /var/lib/apt/lists/* /root/.npm /root/.cache /tmp/* /var/tmp/*
  rm -rf /home/code/.npm /home/code/.cache
  find /var/log -type f \( -name '*.log' -o -name '*.gz' \) -delete 2>/dev/null || true
  journalctl --rotate >/dev/null 2>&1 || true
  journalctl --vacuum-time=1s >/dev/null 2>&1 || true
}

step="${1:?usage: coi-image.sh STEP}"
case "$step" in
  packages|nodejs|gh|docker|user|power|tools|verify|cleanup) "step_$step" ;;
  *) echo "unknown step: $step" >&2; exit 2 ;;
esac
