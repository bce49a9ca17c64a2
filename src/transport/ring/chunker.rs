//! Cutting one `send` call's buffers into chunks: the read position over
//! the caller's pieces that every slot-ring sink walks as it places chunks.

/// A read position over the buffers of one [`crate::transport::RecordSink`]
/// call, taken a chunk at a time. Empty buffers are stepped over and never
/// handed out.
pub struct Chunker<'a> {
    bufs: &'a [&'a [u8]],
    /// Next byte: `bufs[bi][bo]`.
    bi: usize,
    bo: usize,
    /// Bytes not yet taken.
    left: usize,
}

impl<'a> Chunker<'a> {
    pub fn new(bufs: &'a [&'a [u8]]) -> Self {
        Chunker {
            bufs,
            bi: 0,
            bo: 0,
            left: bufs.iter().map(|b| b.len()).sum(),
        }
    }

    /// Bytes not yet taken.
    pub fn left(&self) -> usize {
        self.left
    }

    /// Bytes held by the next `pieces` non-empty pieces: the most one chunk
    /// can take when each piece costs the sender one entry (an iovec).
    pub fn span(&self, pieces: usize) -> usize {
        let mut cap = 0;
        let mut n_pieces = 0;
        for (i, b) in self.bufs.iter().enumerate().skip(self.bi) {
            let n = b.len() - if i == self.bi { self.bo } else { 0 };
            if n > 0 {
                if n_pieces == pieces {
                    break;
                }
                cap += n;
                n_pieces += 1;
            }
        }
        cap
    }

    /// Takes the next `n` bytes (`n <= self.left()`), handing each
    /// non-empty piece of them to `f`, in order.
    pub fn take(&mut self, n: usize, mut f: impl FnMut(&'a [u8])) {
        assert!(
            n <= self.left,
            "chunk of {n} bytes past the {} left",
            self.left
        );
        self.left -= n;
        let mut want = n;
        while want > 0 {
            let src = &self.bufs[self.bi][self.bo..];
            let k = src.len().min(want);
            if k > 0 {
                f(&src[..k]);
            }
            want -= k;
            self.bo += k;
            if self.bo == self.bufs[self.bi].len() {
                self.bi += 1;
                self.bo = 0;
            }
        }
    }

    /// Takes the next `dst.len()` bytes into `dst`.
    pub fn copy_into(&mut self, dst: &mut [u8]) {
        let mut at = 0;
        self.take(dst.len(), |src| {
            dst[at..at + src.len()].copy_from_slice(src);
            at += src.len();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cross_buffers_and_skip_empty_ones() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let bufs: [&[u8]; 4] = [&[], &a, &[], &b];
        let mut c = Chunker::new(&bufs);
        assert_eq!(c.left(), 5);
        assert_eq!(c.span(1), 3);
        assert_eq!(c.span(2), 5);
        let mut dst = [0u8; 2];
        c.copy_into(&mut dst);
        assert_eq!(dst, [1, 2]);
        assert_eq!((c.left(), c.span(1)), (3, 1));
        let mut pieces = Vec::new();
        c.take(3, |p| pieces.push(p.to_vec()));
        assert_eq!(pieces, vec![vec![3], vec![4, 5]]);
        assert_eq!((c.left(), c.span(8)), (0, 0));
    }
}
