# The built-in-guest VM tests (tests/vm.rs) on SVM.
exec e2e-vm --test-threads=2
