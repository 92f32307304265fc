"""Shell completion for bash, zsh and fish, generated from the argparse tree.

Static words (commands, flags) are written into the script; container names (also
the value of ``--container``), saved session ids, branch sessions, snapshot names and
prompt names come live from ``coi __complete containers|sessions|branches|snapshots|prompts``.
"""

from __future__ import annotations

import argparse

# Arguments that take a container name or a saved session id.
CONTAINER_ARGS = {"name", "names", "container"}
SESSION_ARGS = {"session_id"}
BRANCH_ARGS = {"branch_name"}  # branch sessions of the current workspace
SNAPSHOT_ARGS = {"snapshot"}  # snapshots of the current workspace's only session container
# Flags whose value comes live from ``coi __complete WHAT``.
FLAG_VALUES = {"--prompt-name": "prompts", "--container": "containers"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps no public accessor for these
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_table(parser: argparse.ArgumentParser) -> dict[str, dict[str, str]]:
    """``"shell"`` / ``"image list"`` -> {"flags": "...", "subs": "...",
    "dynamic": "containers|sessions|branches|snapshots|"}."""
    table: dict[str, dict[str, str]] = {}

    def visit(prefix: str, p: argparse.ArgumentParser) -> None:
        subs = _subparsers(p)
        flags = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--"))
        dests = {a.dest for a in p._actions if not a.option_strings}
        dynamic = "containers" if dests & CONTAINER_ARGS else "sessions" if dests & SESSION_ARGS \
            else "branches" if dests & BRANCH_ARGS else "snapshots" if dests & SNAPSHOT_ARGS else ""
        table[prefix] = {"flags": " ".join(flags), "subs": " ".join(sorted(subs)), "dynamic": dynamic}
        for name, sub in subs.items():
            visit(f"{prefix} {name}".strip(), sub)

    visit("", parser)
    for v in table.values():  # hidden commands (``__complete``) are not offered
        v["subs"] = " ".join(w for w in v["subs"].split() if not w.startswith("__"))
    return {k: v for k, v in table.items() if not k.startswith("__")}


def bash(parser: argparse.ArgumentParser) -> str:
    table = command_table(parser)

    def array(name: str, field: str) -> str:
        items = " ".join(f'["{key or "_"}"]="{v[field]}"' for key, v in table.items())
        return f"declare -gA {name}=( {items} )"

    return f"""# coi completion for bash: eval "$(coi completion bash)"
{array("_coi_subs", "subs")}
{array("_coi_flags", "flags")}
{array("_coi_dyn", "dynamic")}
declare -gA _coi_flag_dyn=( {" ".join(f'["{flag}"]="{what}"' for flag, what in FLAG_VALUES.items())} )
_coi() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" path="" next w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ $w == -* ]] && continue
        next="${{path:+$path }}$w"
        [[ -n "${{_coi_subs[$next]+set}}" ]] && path="$next"
    done
    local key="${{path:-_}}"
    if [[ $cur == --resume=* || $cur == --continue=* ]]; then
        COMPREPLY=( $(compgen -P "${{cur%%=*}}=" -W "$(coi __complete sessions 2>/dev/null)" -- "${{cur#*=}}") )
    elif [[ $cur == --*=* && -n "${{_coi_flag_dyn[${{cur%%=*}}]+set}}" ]]; then
        COMPREPLY=( $(compgen -P "${{cur%%=*}}=" -W "$(coi __complete ${{_coi_flag_dyn[${{cur%%=*}}]}} 2>/dev/null)" -- "${{cur#*=}}") )
    elif [[ -n "${{_coi_flag_dyn[$prev]+set}}" ]]; then
        COMPREPLY=( $(compgen -W "$(coi __complete ${{_coi_flag_dyn[$prev]}} 2>/dev/null)" -- "$cur") )
    elif [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W "${{_coi_flags[$key]}}" -- "$cur") )
    else
        local words="${{_coi_subs[$key]}}"
        [[ -n "${{_coi_dyn[$key]}}" ]] && words="$words $(coi __complete ${{_coi_dyn[$key]}} 2>/dev/null)"
        COMPREPLY=( $(compgen -W "$words" -- "$cur") )
    fi
}}
complete -o default -F _coi coi
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    """A native zsh completion function (``#compdef coi``): save it as ``_coi`` in a
    directory of ``$fpath``, or ``eval`` it. (Not ``path``: zsh ties it to ``$PATH``.)"""
    table = command_table(parser)

    def array(name: str, field: str) -> str:
        items = " ".join(f"{_zsh_word(key or '_')} {_zsh_word(v[field])}" for key, v in table.items())
        return f"typeset -gA {name}\n{name}=( {items} )"

    return f"""#compdef coi
# coi completion for zsh: save as _coi in a directory of $fpath, or eval "$(coi completion zsh)"
{array("_coi_subs", "subs")}
{array("_coi_flags", "flags")}
{array("_coi_dyn", "dynamic")}
typeset -gA _coi_flag_dyn
_coi_flag_dyn=( {" ".join(f"{_zsh_word(flag)} {_zsh_word(what)}" for flag, what in FLAG_VALUES.items())} )
_coi() {{
    local cpath="" next w i
    for ((i = 2; i < CURRENT; i++)); do
        w="${{words[i]}}"
        [[ $w == -* ]] && continue
        next="${{cpath:+$cpath }}$w"
        (( ${{+_coi_subs[$next]}} )) && cpath="$next"
    done
    local key="${{cpath:-_}}" cur="${{words[CURRENT]}}" prev="${{words[CURRENT-1]}}"
    if [[ $cur == --resume=* || $cur == --continue=* ]]; then
        compset -P '*='
        compadd -- ${{(f)"$(coi __complete sessions 2>/dev/null)"}}
    elif [[ $cur == --*=* ]] && (( ${{+_coi_flag_dyn[${{cur%%=*}}]}} )); then
        local what="${{_coi_flag_dyn[${{cur%%=*}}]}}"
        compset -P '*='
        compadd -- ${{(f)"$(coi __complete $what 2>/dev/null)"}}
    elif (( ${{+_coi_flag_dyn[$prev]}} )); then
        compadd -- ${{(f)"$(coi __complete ${{_coi_flag_dyn[$prev]}} 2>/dev/null)"}}
    elif [[ $cur == -* ]]; then
        compadd -- ${{=_coi_flags[$key]}}
    else
        compadd -- ${{=_coi_subs[$key]}}
        [[ -n ${{_coi_dyn[$key]}} ]] && compadd -- ${{(f)"$(coi __complete ${{_coi_dyn[$key]}} 2>/dev/null)"}}
        _files
    fi
}}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _coi "$@"
else
    compdef _coi coi
fi
"""


def _zsh_word(text: str) -> str:
    """``text`` as one single-quoted zsh word."""
    return "'" + text.replace("'", "'\\''") + "'"


def fish(parser: argparse.ArgumentParser) -> str:
    table = command_table(parser)
    lines = ["# coi completion for fish: coi completion fish | source", "complete -c coi -f"]
    top = table[""]
    lines.append(f"complete -c coi -n '__fish_use_subcommand' -a '{top['subs']}'")
    for key, v in table.items():
        if not key:
            continue
        words = key.split()
        cond = " && ".join(f"__fish_seen_subcommand_from {w}" for w in words)
        if v["subs"]:
            lines.append(f"complete -c coi -n '{cond}' -a '{v['subs']}'")
        for flag in v["flags"].split():
            live = f" -x -a '(coi __complete {FLAG_VALUES[flag]} 2>/dev/null)'" if flag in FLAG_VALUES else ""
            lines.append(f"complete -c coi -n '{cond}' -l {flag[2:]}{live}")
        if v["dynamic"]:
            lines.append(f"complete -c coi -n '{cond}' -a '(coi __complete {v['dynamic']} 2>/dev/null)'")
    return "\n".join(lines) + "\n"


SHELLS = {"bash": bash, "zsh": zsh, "fish": fish}
