# The built-in-guest template and clone tests (tests/template.rs) on SVM.
exec e2e-template --test-threads=2
