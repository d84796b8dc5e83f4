# Stock Debian Linux with the built initramfs (minivmm image linux) boots
# under minivmm on SVM, and its agent (the Linux agent as /init) answers.
set -e

# Waits until FILE has a line matching PATTERN, at most SECS seconds: tail -f
# wakes on each write, grep ends at the first match.
wait_for_line() {
    rm -f /tmp/linux-boot.fifo && mkfifo /tmp/linux-boot.fifo
    tail -n +1 -f "$1" > /tmp/linux-boot.fifo &
    tailpid=$!
    rc=0
    timeout "$3" grep -q -m1 "$2" < /tmp/linux-boot.fifo || rc=$?
    kill $tailpid 2>/dev/null || true
    return $rc
}

S=/tmp/linux-boot.vsock
C=/tmp/linux-boot.console
: > $C
minivmm run --kernel "$NESTED_LINUX/vmlinuz" --initrd "$NESTED_LINUX/initramfs.img" \
    --vsock $S --console $C &
vm=$!
if ! wait_for_line $C 'minivmm-linux-agent ready' 300; then
    echo "no agent ready line; guest console:"; tail -n 40 $C
    kill $vm 2>/dev/null || true
    exit 1
fi
echo "guest: $(grep -m1 'minivmm-linux-agent:' $C)"
minivmm agent --vsock $S check
minivmm agent --vsock $S details | tee /tmp/linux-boot.details
grep -q '^kernel: .*-amd64$' /tmp/linux-boot.details
minivmm agent --vsock $S rng 32
kill $vm
wait $vm || true
echo "linux-boot: PASS"
