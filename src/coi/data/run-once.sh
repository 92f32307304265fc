# coi's run-once guard, run as  sh -c "<this text>" MARKER MODE COMMAND [ARG...]
#
# Incus sometimes reports that it lost the PID of a command it did start (and
# run to its end); coi then asks again. The first start makes the directory
# MARKER and runs COMMAND; a later start never runs it a second time. It waits
# while the first one still runs (its pid is in MARKER/pid), then exits with the
# recorded status, or with 254 and a note when that status is unknown.
#
# MODE "recorded" (no terminal): the guard stays COMMAND's parent, records its
# exit status in MARKER/rc for a later start, and passes INT, TERM and HUP on as
# TERM (a background child ignores INT). MODE "terminal": COMMAND replaces the
# guard, so the terminal's signals reach it as usual; its status is not kept.
m=$0
mode=$1
shift
if ! mkdir "$m" 2>/dev/null; then
  i=0
  while [ ! -e "$m/rc" ]; do
    p=$(cat "$m/pid" 2>/dev/null)
    if [ -n "$p" ]; then
      kill -0 "$p" 2>/dev/null || break
    elif [ $i -ge 40 ]; then
      break  # the first start never wrote its pid: it is not coming
    fi
    i=$((i + 1))
    sleep 0.05
  done
  if [ -e "$m/rc" ]; then
    echo "coi: Incus lost track of the command; its exit status was recovered, its output may be incomplete" >&2
    exit "$(cat "$m/rc")"
  fi
  echo "coi: the command had already started once; its exit status is unknown" >&2
  exit 254
fi
echo $$ > "$m/pid"
if [ "$mode" = terminal ]; then
  exec "$@"
fi
exec 3<&0
"$@" <&3 3<&- &
p=$!
exec 3<&-
trap 'got=1; kill -TERM $p 2>/dev/null' INT TERM HUP
while :; do
  got=
  wait $p
  rc=$?
  [ -n "$got" ] || break  # wait returned for a signal: wait again for the command's own status
done
echo $rc > "$m/rc"
exit $rc
