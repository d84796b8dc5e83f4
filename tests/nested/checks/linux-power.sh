# A Linux guest's poweroff ends `minivmm run` through the ACPI sleep
# registers (FADT, port 0x600) and its reboot through the i8042 (minivmm's
# default Linux command line has reboot=k): both are a clean end, exit 0. The guest is the Debian kernel
# with a two-line busybox /init.
set -e
R=/tmp/linux-power-root
for what in poweroff reboot; do
    rm -rf $R && mkdir -p $R/bin
    cp /bin/busybox $R/bin/busybox
    printf '#!/bin/busybox sh\n/bin/busybox echo "linux-power: %s now"\n/bin/busybox %s -f\n' \
        "$what" "$what" > $R/init
    chmod 755 $R/init
    (cd $R && find . | cpio -o -H newc 2>/dev/null) > /tmp/linux-power.cpio
    C=/tmp/linux-power-$what.console
    rc=0
    timeout 300 minivmm run --kernel "$NESTED_LINUX/vmlinuz" --initrd /tmp/linux-power.cpio \
        --console $C 2> /tmp/linux-power.err || rc=$?
    cat /tmp/linux-power.err
    if [ $rc -ne 0 ] || ! grep -q "linux-power: $what now" $C; then
        echo "$what: exit $rc; guest console:"; tail -n 30 $C
        exit 1
    fi
    case $what in
        poweroff) grep -q "guest powered off" /tmp/linux-power.err ;;
        reboot) grep -q "guest reset" /tmp/linux-power.err ;;
    esac
    echo "linux-power: $what ended the VM cleanly"
done
echo "linux-power: PASS"
