//! `--shard i/n`: which slice of the user range this process drives, so
//! several processes or machines share one run without overlapping users.

use std::ops::Range;
use std::str::FromStr;

/// Slice `index` of `count` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's slice.
    pub index: u32,
    /// How many slices share the run.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let (index, count) = text
            .split_once('/')
            .ok_or_else(|| format!("shard {text:?} is not i/n"))?;
        let index: u32 = index
            .trim()
            .parse()
            .map_err(|e| format!("shard index: {e}"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|e| format!("shard count: {e}"))?;
        if count == 0 || index >= count {
            return Err(format!("shard {index}/{count}: need 0 <= i < n"));
        }
        Ok(Shard { index, count })
    }
}

impl Shard {
    /// This shard's users among `total`: contiguous, sizes differing by at
    /// most one, together covering `0..total` exactly once.
    pub fn users(&self, total: u64) -> Range<u64> {
        let count = u64::from(self.count);
        let index = u64::from(self.index);
        let base = total / count;
        let extra = total % count;
        let start = index * base + index.min(extra);
        let len = base + u64::from(index < extra);
        start..start + len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_range_once() {
        for total in [0u64, 1, 7, 10, 1_000_003] {
            for count in [1u32, 2, 3, 7, 16] {
                let mut next = 0;
                for index in 0..count {
                    let range = Shard { index, count }.users(total);
                    assert_eq!(range.start, next, "contiguous");
                    assert!(range.end - range.start <= total / u64::from(count) + 1);
                    next = range.end;
                }
                assert_eq!(next, total, "complete");
            }
        }
    }

    #[test]
    fn shard_parsing_rejects_nonsense() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert!("4/4".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}
