//! The agent program. All of it is in the library (so that its pure logic is
//! unit-tested on the host); this binary only links it with agent.ld.

#![no_std]
#![no_main]

use testguest_agent as _;
