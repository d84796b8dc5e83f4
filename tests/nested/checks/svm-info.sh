# The outer VM's /dev/kvm is hardware-style KVM (SVM under QEMU's -cpu max),
# not PVM: minivmm must say so.
set -e
minivmm info
minivmm info | grep -q '^flavour *Svm$'
