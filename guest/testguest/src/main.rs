//! The minivmm test guest image. All of it is in the library (so that its
//! pure logic is unit-tested on the host); this binary only links it with
//! link.ld into the ELF the VMM boots.

#![no_std]
#![no_main]

use testguest as _;
