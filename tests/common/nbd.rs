//! A minimal NBD client for tests: fixed newstyle, NBD_OPT_GO, simple
//! replies, one request at a time.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub struct Nbd {
    s: TcpStream,
    pub size: u64,
    cookie: u64,
}

impl Nbd {
    /// Connects to `addr` and selects export `name`.
    pub fn connect(addr: &str, name: &str) -> std::io::Result<Nbd> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        assert_eq!(
            u64::from_be_bytes(hello[0..8].try_into().unwrap()),
            NBDMAGIC
        );
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), REPLY_MAGIC);
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d)?;
            match kind {
                1 => break, // ACK
                3 if d.len() >= 10 && d[0..2] == [0, 0] => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap())
                }
                3 => {}
                k => return Err(std::io::Error::other(format!("GO refused: reply {k:#x}"))),
            }
        }
        Ok(Nbd { s, size, cookie: 0 })
    }

    /// Sends one request (`data` follows the header) and returns the
    /// error of its simple reply.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<u32> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            self.cookie
        );
        Ok(u32::from_be_bytes(h[4..8].try_into().unwrap()))
    }

    /// The connection, for tests that send malformed bytes.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    /// WRITE; returns the NBD error (0 = completed).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.request(1, 0, offset, data.len() as u32, data)
    }

    pub fn flush(&mut self) -> std::io::Result<u32> {
        self.request(3, 0, 0, 0, &[])
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let e = self.request(0, 0, offset, len, &[])?;
        assert_eq!(e, 0, "read error");
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d)?;
        Ok(d)
    }
}
