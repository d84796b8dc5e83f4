# The built-in-guest agent tests (tests/agent.rs) on SVM. The PVM
# native-mode test checks only what applies off PVM.
exec e2e-agent --test-threads=2
