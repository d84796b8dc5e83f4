# The built-in-guest agent tests (tests/agent.rs) on SVM, one at a time:
# eight_concurrent_connections_each_make_100_calls keeps every call under a
# 10 s deadline, which two tests at once under software emulation can miss.
# The PVM native-mode test checks only what applies off PVM.
exec e2e-agent --test-threads=1
