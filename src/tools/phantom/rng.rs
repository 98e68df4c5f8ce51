//! Deterministic randomness for the phantom: a SplitMix64 generator, named streams, and lattice value noise.
//!
//! Owns: every random number the phantom draws. Never: reads the clock or the OS entropy pool, so a seed
//! reproduces a series byte for byte.

/// SplitMix64 finaliser: a good 64-bit mixing function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a label, to derive independent streams from one seed.
fn fnv(label: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// SplitMix64 pseudo-random generator.
#[derive(Debug, Clone)]
pub struct Rng {
    /// Generator state; advanced by the golden-ratio increment.
    state: u64,
}

impl Rng {
    /// A generator for one named purpose of one seed; streams with different labels are independent.
    pub fn stream(seed: u64, label: &str) -> Rng {
        Rng { state: mix64(seed ^ mix64(fnv(label))) }
    }

    /// A generator for one named purpose and an index (a slice, a lesion).
    pub fn indexed(seed: u64, label: &str, index: u64) -> Rng {
        Rng { state: mix64(mix64(seed ^ mix64(fnv(label))) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15)) }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-300);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Picks one element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A random unit vector.
    pub fn unit3(&mut self) -> [f64; 3] {
        loop {
            let v = [self.range(-1.0, 1.0), self.range(-1.0, 1.0), self.range(-1.0, 1.0)];
            let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            if n > 0.05 && n <= 1.0 {
                return [v[0] / n, v[1] / n, v[2] / n];
            }
        }
    }
}

/// Fast per-pixel generator for scanner noise (xorshift64*), seeded from a `Rng`.
pub struct FastRng(u64);

impl FastRng {
    /// Seeded generator; a zero seed is remapped.
    pub fn new(seed: u64) -> FastRng {
        FastRng(if seed == 0 { 0x2545_f491_4f6c_dd1d } else { seed })
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Approximately standard normal: Irwin–Hall sum of four uniforms, rescaled to unit variance.
    #[inline]
    pub fn normal(&mut self) -> f32 {
        let r = self.next_u64();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // mean 4 * 32767.5, variance 4 * 65536^2 / 12
        (s as f32 - 131_070.0) * (3.0f32.sqrt() / 65_536.0)
    }
}

#[inline]
fn lattice(seed: u32, x: i32, y: i32, z: i32) -> f32 {
    let mut h = seed
        ^ (x as u32).wrapping_mul(0x8da6_b343)
        ^ (y as u32).wrapping_mul(0xd816_3841)
        ^ (z as u32).wrapping_mul(0xcb1a_b31f);
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    h = h.wrapping_mul(0x297a_2d39);
    h ^= h >> 15;
    (h >> 8) as f32 * (1.0 / 16_777_215.0)
}

#[inline]
fn fade(t: f32) -> f32 {
    t * t * (3.0 - 2.0 * t)
}

/// Smooth 3D value noise in [0, 1] with unit lattice spacing.
#[inline]
pub fn noise3(seed: u32, x: f32, y: f32, z: f32) -> f32 {
    let (fx, fy, fz) = (x.floor(), y.floor(), z.floor());
    let (ix, iy, iz) = (fx as i32, fy as i32, fz as i32);
    let (tx, ty, tz) = (fade(x - fx), fade(y - fy), fade(z - fz));
    let c000 = lattice(seed, ix, iy, iz);
    let c100 = lattice(seed, ix + 1, iy, iz);
    let c010 = lattice(seed, ix, iy + 1, iz);
    let c110 = lattice(seed, ix + 1, iy + 1, iz);
    let c001 = lattice(seed, ix, iy, iz + 1);
    let c101 = lattice(seed, ix + 1, iy, iz + 1);
    let c011 = lattice(seed, ix, iy + 1, iz + 1);
    let c111 = lattice(seed, ix + 1, iy + 1, iz + 1);
    let x00 = c000 + (c100 - c000) * tx;
    let x10 = c010 + (c110 - c010) * tx;
    let x01 = c001 + (c101 - c001) * tx;
    let x11 = c011 + (c111 - c011) * tx;
    let y0 = x00 + (x10 - x00) * ty;
    let y1 = x01 + (x11 - x01) * ty;
    y0 + (y1 - y0) * tz
}

/// Fractal sum of `octaves` noise layers (each twice the frequency, half the amplitude), in [0, 1].
#[inline]
pub fn fbm3(seed: u32, x: f32, y: f32, z: f32, octaves: u32) -> f32 {
    let (mut sum, mut amp, mut norm, mut f) = (0.0f32, 1.0f32, 0.0f32, 1.0f32);
    for o in 0..octaves {
        sum += amp * noise3(seed.wrapping_add(o.wrapping_mul(0x9e37_79b9)), x * f, y * f, z * f);
        norm += amp;
        amp *= 0.5;
        f *= 2.03;
    }
    sum / norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u64> = (0..4).map(|_| Rng::stream(7, "x").next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::stream(7, "x").next_u64(), Rng::stream(7, "y").next_u64());
        assert_ne!(Rng::stream(7, "x").next_u64(), Rng::stream(8, "x").next_u64());
    }

    #[test]
    fn noise_in_unit_range_and_normal_has_unit_variance() {
        for i in 0..1000 {
            let v = noise3(3, i as f32 * 0.37, i as f32 * 0.11, -(i as f32) * 0.23);
            assert!((0.0..=1.0).contains(&v));
        }
        let mut r = FastRng::new(5);
        let n = 100_000;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let v = r.normal() as f64;
            s += v;
            s2 += v * v;
        }
        let mean = s / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
    }
}
