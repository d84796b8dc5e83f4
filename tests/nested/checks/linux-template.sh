# A Linux template and 3 clones: every clone answers Check, their `rng 32`
# differ, their wall clock is the outer host's (within 2 s), the template's
# memory file is byte-identical after the clones wrote memory (TouchMemory),
# and `minivmm bench clone --template D` prints JSON.
set -e

# Waits until FILE has a line matching PATTERN, at most SECS seconds: tail -f
# wakes on each write, grep ends at the first match.
wait_for_line() {
    rm -f /tmp/linux-template.fifo && mkfifo /tmp/linux-template.fifo
    tail -n +1 -f "$1" > /tmp/linux-template.fifo &
    tailpid=$!
    rc=0
    timeout "$3" grep -q -m1 "$2" < /tmp/linux-template.fifo || rc=$?
    kill $tailpid 2>/dev/null || true
    return $rc
}

D=/tmp/linux-template
V=/tmp/linux-clones
rm -rf $D $V && mkdir -p $V
minivmm template create --dir $D --kernel "$NESTED_LINUX/vmlinuz" \
    --initrd "$NESTED_LINUX/initramfs.img"
mem_before=$(sha256sum $D/memory | cut -d' ' -f1)
echo "template memory sha256 $mem_before"

: > /tmp/linux-clones.log
minivmm clone --template $D --count 3 --vsock-dir $V --keep > /tmp/linux-clones.log 2>&1 &
clones=$!
# However the check ends, the clones go with it.
trap 'kill $clones 2>/dev/null || true' EXIT
if ! wait_for_line /tmp/linux-clones.log 'clone(s) running' 300; then
    cat /tmp/linux-clones.log
    kill $clones 2>/dev/null || true
    exit 1
fi
cat /tmp/linux-clones.log

# Calls get 60 s: first touches of guest memory are slow under emulation.
agent() { minivmm agent --vsock "$1" --timeout-ms 60000 "$2" $3; }
fail=0
for i in 0 1 2; do
    s=$V/clone-$i.vsock
    agent $s check | grep -q 'status: SERVING' || { echo "clone $i: no Check"; fail=1; }
    agent $s rng 32 | sed -n 's/^bytes: //p' > /tmp/linux-rng-$i
    echo "clone $i rng $(cat /tmp/linux-rng-$i)"
    # The guest's clock read during the call, against the outer host's
    # clock just before and just after it.
    before=$(date +%s)
    guest=$(agent $s time | sed -n 's/^sec: //p')
    after=$(date +%s)
    echo "clone $i wall clock $guest, outer host $before..$after"
    if [ "$guest" -lt $((before - 2)) ] || [ "$guest" -gt $((after + 2)) ]; then
        echo "clone $i: clock more than 2 s off"; fail=1
    fi
    agent $s touch 1024
done
for pair in "0 1" "0 2" "1 2"; do
    set -- $pair
    if [ ! -s /tmp/linux-rng-$1 ] || cmp -s /tmp/linux-rng-$1 /tmp/linux-rng-$2; then
        echo "clones $1 and $2: rng outputs not distinct"; fail=1
    fi
done
mem_after=$(sha256sum $D/memory | cut -d' ' -f1)
echo "template memory sha256 after the clones wrote memory $mem_after"
[ "$mem_before" = "$mem_after" ] || { echo "template memory changed"; fail=1; }
kill $clones
wait $clones || true
trap - EXIT

# Figures under software emulation mean nothing; the JSON must be there.
minivmm bench clone --template $D --count 3 --cold-boots 1 --json > /tmp/linux-bench.json
cat /tmp/linux-bench.json
grep -q '^{' /tmp/linux-bench.json || { echo "bench clone: no JSON"; fail=1; }
minivmm template rm --dir $D
[ $fail = 0 ] && echo "linux-template: PASS"
exit $fail
