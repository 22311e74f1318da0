//! The pseudo-random generator of Python's `random.Random(seed)` (MT19937 seeded with
//! `init_by_array`, 53-bit floats), so that a learner seeded like its River counterpart
//! draws the same numbers and builds the same model: `hst` builds River's exact trees.
//!
//! Only what the learners use is here: seeding from a non-negative integer, `random()`,
//! `uniform(a, b)` and one weighted `choices` draw. It is used while a model is built and
//! not kept in the model's state.

const N: usize = 624;
const M: usize = 397;

/// Python's `random.Random`, for integer seeds.
pub(crate) struct PyRandom {
    mt: Box<[u32; N]>,
    index: usize,
}

impl PyRandom {
    /// `random.Random(seed)`: the seed's 32-bit words, least significant first, through
    /// `init_by_array` (as CPython's `random_seed` does for an int).
    pub(crate) fn new(seed: u64) -> Self {
        let key: Vec<u32> = if seed >> 32 == 0 {
            vec![seed as u32]
        } else {
            vec![seed as u32, (seed >> 32) as u32]
        };
        let mut r = PyRandom {
            mt: Box::new([0; N]),
            index: N,
        };
        r.init_genrand(19_650_218);
        let mut i = 1usize;
        let mut j = 0usize;
        for _ in 0..N.max(key.len()) {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                r.mt[0] = r.mt[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = r.mt[i - 1] ^ (r.mt[i - 1] >> 30);
            r.mt[i] = (r.mt[i] ^ prev.wrapping_mul(1_566_083_941)).wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                r.mt[0] = r.mt[N - 1];
                i = 1;
            }
        }
        r.mt[0] = 0x8000_0000;
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.mt[0] = s;
        for i in 1..N {
            let prev = self.mt[i - 1] ^ (self.mt[i - 1] >> 30);
            self.mt[i] = 1_812_433_253u32.wrapping_mul(prev).wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.mt[k] & 0x8000_0000) | (self.mt[(k + 1) % N] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.mt[k] = self.mt[(k + M) % N] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `random()`: uniform in [0, 1) with 53 random bits.
    pub(crate) fn random(&mut self) -> f64 {
        let a = self.next_u32() >> 5;
        let b = self.next_u32() >> 6;
        (f64::from(a) * 67_108_864.0 + f64::from(b)) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `uniform(a, b)`: `a + (b - a) * random()`.
    pub(crate) fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * self.random()
    }

    /// `choices(range(len(weights)), weights)[0]`: an index drawn with the given weights.
    pub(crate) fn weighted_index(&mut self, weights: &[f64]) -> usize {
        let mut cum = Vec::with_capacity(weights.len());
        let mut total = 0.0;
        for w in weights {
            total += w;
            cum.push(total);
        }
        let x = self.random() * total;
        // bisect_right(cum, x, 0, n - 1)
        let hi = weights.len() - 1;
        cum[..hi].partition_point(|&c| c <= x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_what_cpython_draws() {
        // python3 -c "import random; r = random.Random(42); print([r.random() for _ in range(3)])"
        let mut r = PyRandom::new(42);
        assert_eq!(r.random(), 0.6394267984578837);
        assert_eq!(r.random(), 0.025010755222666936);
        assert_eq!(r.random(), 0.27502931836911926);
        // python3 -c "import random; r = random.Random(0); print(r.random(), r.uniform(2, 5))"
        let mut r = PyRandom::new(0);
        assert_eq!(r.random(), 0.8444218515250481);
        assert_eq!(r.uniform(2.0, 5.0), 4.273863208820908);
        // python3 -c "import random; r = random.Random(7);
        //   print([r.choices([0, 1, 2], weights=[1.0, 0.5, 2.0])[0] for _ in range(8)])"
        let mut r = PyRandom::new(7);
        let got: Vec<usize> = (0..8).map(|_| r.weighted_index(&[1.0, 0.5, 2.0])).collect();
        assert_eq!(got, CHOICES_SEED_7);
        // A seed wider than 32 bits: python3 -c "import random; print(random.Random(2**40+5).random())"
        assert_eq!(PyRandom::new((1 << 40) + 5).random(), 0.5043802970418443);
    }

    /// CPython's draws, from the command above.
    const CHOICES_SEED_7: [usize; 8] = [1, 0, 2, 0, 2, 1, 0, 2];
}
