//! ChaCha20 (RFC 8439 §2.3) and the agent's CSPRNG built on it.
//!
//! The generator keeps a 256-bit key. Output uses fast key erasure: each
//! request runs ChaCha20 under the current key from block 0, takes the first
//! 32 bytes as the next key and hands out the bytes after them, so every
//! request changes the state (two reads differ) and earlier output cannot be
//! recomputed from the state. Entropy (virtio-rng, the host's reseeds) is
//! absorbed 32 bytes at a time: the chunk is XORed into the key and the key
//! replaced by the first half of a ChaCha20 block under the result, with the
//! chunk index and the input length in the nonce (domain-separated from
//! output by the nonce's first word). A chunk chosen by someone who does not
//! know the key does not reduce what the key holds.

/// "expand 32-byte k" (RFC 8439 §2.3).
const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];
/// Nonce word 0 of output blocks and of absorb blocks.
const DOMAIN_OUTPUT: u32 = 0;
const DOMAIN_ABSORB: u32 = 0x6d69_7869; // "ixim"

fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 §2.3): 64 bytes of key stream for
/// `key`, block `counter` and `nonce` (all as little-endian words).
pub fn block(key: &[u32; 8], counter: u32, nonce: &[u32; 3]) -> [u8; 64] {
    let mut init = [0u32; 16];
    init[..4].copy_from_slice(&SIGMA);
    init[4..12].copy_from_slice(key);
    init[12] = counter;
    init[13..].copy_from_slice(nonce);
    let mut s = init;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    let mut out = [0u8; 64];
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        chunk.copy_from_slice(&s[i].wrapping_add(init[i]).to_le_bytes());
    }
    out
}

/// Little-endian words of up to 32 bytes (zero-padded).
pub fn words(bytes: &[u8]) -> [u32; 8] {
    let mut w = [0u32; 8];
    for (i, b) in bytes.iter().take(32).enumerate() {
        w[i / 4] |= u32::from(*b) << (8 * (i % 4));
    }
    w
}

/// XORs the ChaCha20 key stream (from block `counter`) into `data`
/// (RFC 8439 §2.4).
pub fn xor_stream(key: &[u32; 8], counter: u32, nonce: &[u32; 3], data: &mut [u8]) {
    for (i, chunk) in data.chunks_mut(64).enumerate() {
        let ks = block(key, counter.wrapping_add(i as u32), nonce);
        for (d, k) in chunk.iter_mut().zip(ks.iter()) {
            *d ^= k;
        }
    }
}

/// The agent's random number generator (see the module doc).
pub struct Csprng {
    key: [u32; 8],
    /// Requests served, in the output nonce (belt and braces: the key
    /// changes on every request anyway).
    requests: u64,
}

impl Csprng {
    /// A generator keyed from `seed` (any length; the more entropy the better).
    pub fn new(seed: &[u8]) -> Csprng {
        let mut rng = Csprng {
            key: [0; 8],
            requests: 0,
        };
        rng.absorb(seed);
        rng
    }

    /// Mixes `data` into the key.
    pub fn absorb(&mut self, data: &[u8]) {
        let len = data.len() as u32;
        let mut absorb_chunk = |index: u32, chunk: &[u8]| {
            let mut k = self.key;
            for (w, c) in k.iter_mut().zip(words(chunk)) {
                *w ^= c;
            }
            let b = block(&k, 0, &[DOMAIN_ABSORB, index, len]);
            self.key = words(&b[..32]);
        };
        if data.is_empty() {
            absorb_chunk(0, &[]);
        }
        for (i, chunk) in data.chunks(32).enumerate() {
            absorb_chunk(i as u32, chunk);
        }
    }

    /// Fills `out` with random bytes and moves to a new key.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.requests = self.requests.wrapping_add(1);
        let nonce = [
            DOMAIN_OUTPUT,
            self.requests as u32,
            (self.requests >> 32) as u32,
        ];
        let first = block(&self.key, 0, &nonce);
        let next_key = words(&first[..32]);
        let (head, rest) = out.split_at_mut(out.len().min(32));
        head.copy_from_slice(&first[32..32 + head.len()]);
        for (i, chunk) in rest.chunks_mut(64).enumerate() {
            let b = block(&self.key, 1 + i as u32, &nonce);
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        self.key = next_key;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    fn sequential_key() -> [u32; 8] {
        words(&(0u8..32).collect::<Vec<_>>())
    }

    /// RFC 8439 §2.3.2.
    #[test]
    fn block_function_test_vector() {
        let nonce = [0x0900_0000, 0x4a00_0000, 0];
        let want = hex("10 f1 e7 e4 d1 3b 59 15 50 0f dd 1f a3 20 71 c4
             c7 d1 f4 c7 33 c0 68 03 04 22 aa 9a c3 d4 6c 4e
             d2 82 64 46 07 9f aa 09 14 c2 d7 05 d9 8b 02 a2
             b5 12 9c d1 de 16 4e b9 cb d0 83 e8 a2 50 3c 4e");
        assert_eq!(block(&sequential_key(), 1, &nonce).to_vec(), want);
    }

    /// RFC 8439 appendix A.1, test vector #1 (all zero).
    #[test]
    fn all_zero_block() {
        let want = hex("76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd 28
             bd d2 19 b8 a0 8d ed 1a a8 36 ef cc 8b 77 0d c7
             da 41 59 7c 51 57 48 8d 77 24 e0 3f b8 d8 4a 37
             6a 43 b8 f4 15 18 a1 1c c3 87 b6 69 b2 ee 65 86");
        assert_eq!(block(&[0; 8], 0, &[0; 3]).to_vec(), want);
    }

    /// RFC 8439 §2.4.2 (the "sunscreen" encryption).
    #[test]
    fn encryption_test_vector() {
        let mut text =
            b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it."
                .to_vec();
        let want = hex("6e 2e 35 9a 25 68 f9 80 41 ba 07 28 dd 0d 69 81
             e9 7e 7a ec 1d 43 60 c2 0a 27 af cc fd 9f ae 0b
             f9 1b 65 c5 52 47 33 ab 8f 59 3d ab cd 62 b3 57
             16 39 d6 24 e6 51 52 ab 8f 53 0c 35 9f 08 61 d8
             07 ca 0d bf 50 0d 6a 61 56 a3 8e 08 8a 22 b6 5e
             52 bc 51 4d 16 cc f8 06 81 8c e9 1a b7 79 37 36
             5a f9 0b bf 74 a3 5b e6 b4 0b 8e ed f2 78 5e 42
             87 4d");
        xor_stream(&sequential_key(), 1, &[0, 0x4a00_0000, 0], &mut text);
        assert_eq!(text, want);
    }

    #[test]
    fn generator_changes_on_every_read_and_reseed() {
        let mut a = Csprng::new(b"seed");
        let mut b = Csprng::new(b"seed");
        let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y, "same seed, same stream");
        a.fill(&mut x);
        assert_ne!(x, y, "a second read differs");
        b.fill(&mut y);
        assert_eq!(x, y);
        b.absorb(b"host entropy");
        a.fill(&mut x);
        b.fill(&mut y);
        assert_ne!(x, y, "a reseed changes the stream");
        let mut z = [0u8; 4096];
        a.fill(&mut z);
        assert!(z.iter().any(|&v| v != 0));
        let mut tiny = [0u8; 3];
        a.fill(&mut tiny);
        a.fill(&mut []);
        assert_ne!(Csprng::new(b"").key, Csprng::new(b"\0").key);
    }
}
