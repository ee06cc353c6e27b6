//! How ranks that share no MPI find each other: rank 0 listens on `MASTER_ADDR:MASTER_PORT`
//! (torchrun's variables; 127.0.0.1:29500 by default, for ranks on one machine) and hands a
//! few bytes (NCCL's unique id) to every other rank that connects.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// torchrun's default port.
pub const DEFAULT_PORT: u16 = 29500;

/// Rank 0's address: `MASTER_ADDR` (default 127.0.0.1) and `MASTER_PORT` (default 29500).
pub fn address(env: &dyn Fn(&str) -> Option<String>) -> Result<String> {
    let port = match env("MASTER_PORT") {
        Some(p) => {
            p.trim().parse::<u16>().map_err(|_| Error::invalid(format!("MASTER_PORT={p}: expected a port number")))?
        }
        None => DEFAULT_PORT,
    };
    let host = env("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    Ok(format!("{host}:{port}"))
}

/// Rank 0's `payload` (`len` bytes) on every rank: rank 0 passes `Some` and waits until the
/// `size - 1` others have connected to `addr` and received it; they pass `None`. Gives up
/// after `timeout`, with an error naming the address.
pub fn share(
    addr: &str,
    rank: usize,
    size: usize,
    payload: Option<&[u8]>,
    len: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    match (rank, payload) {
        (0, Some(p)) if p.len() == len => serve(addr, size - 1, p, deadline).map(|()| p.to_vec()),
        (0, _) => Err(Error::invalid(format!("rank 0 must share {len} bytes"))),
        _ => fetch(addr, rank, len, deadline),
    }
}

fn io(addr: &str, what: &str, e: std::io::Error) -> Error {
    Error::invalid(format!("rendezvous at {addr}: {what}: {e}"))
}

fn serve(addr: &str, peers: usize, payload: &[u8], deadline: Instant) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| io(addr, "rank 0 cannot listen there (is another job on that port? set MASTER_PORT)", e))?;
    listener.set_nonblocking(true).map_err(|e| io(addr, "listen", e))?;
    let mut served = 0;
    while served < peers {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| io(addr, "accept", e))?;
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| io(addr, "accept", e))?;
                // Each rank says who it is first: a stray connection is not a rank.
                let mut hello = [0u8; 8];
                if stream.read_exact(&mut hello).is_err() || &hello[..4] != b"hsr0" {
                    continue;
                }
                stream.write_all(payload).map_err(|e| io(addr, "send", e))?;
                served += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(Error::invalid(format!(
                        "rendezvous at {addr}: {served} of the {peers} other ranks connected in time (are they started, and can they reach this host? set MASTER_ADDR to rank 0's host)"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io(addr, "accept", e)),
        }
    }
    Ok(())
}

fn fetch(addr: &str, rank: usize, len: usize, deadline: Instant) -> Result<Vec<u8>> {
    loop {
        match TcpStream::connect(addr) {
            Ok(mut stream) => {
                stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| io(addr, "connect", e))?;
                let mut hello = *b"hsr0\0\0\0\0";
                hello[4..].copy_from_slice(&(rank as u32).to_le_bytes());
                let mut buf = vec![0u8; len];
                if stream.write_all(&hello).and_then(|()| stream.read_exact(&mut buf)).is_ok() {
                    return Ok(buf);
                }
            }
            Err(_) if Instant::now() < deadline => {}
            Err(e) => {
                let why = format!(
                    "rank {rank} cannot reach rank 0 (set MASTER_ADDR to rank 0's host, MASTER_PORT to a free port)"
                );
                return Err(io(addr, &why, e));
            }
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(format!("rendezvous at {addr}: rank {rank} got no answer from rank 0 in time")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes() {
        let addr = format!("127.0.0.1:{}", free_port());
        let secret: Vec<u8> = (0..128u8).map(|i| i.wrapping_mul(37)).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            // The others start first: they retry until rank 0 listens.
            let handles: Vec<_> = (0..4)
                .rev()
                .map(|rank| {
                    let (addr, secret) = (&addr, &secret);
                    s.spawn(move || {
                        let mine = (rank == 0).then_some(&secret[..]);
                        share(addr, rank, 4, mine, 128, Duration::from_secs(20)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(got.iter().all(|g| g == &secret));
    }

    #[test]
    fn a_missing_rank_zero_is_an_error_naming_the_address() {
        let addr = format!("127.0.0.1:{}", free_port());
        let e = share(&addr, 1, 2, None, 128, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains(&addr) && e.contains("MASTER_ADDR"), "{e}");
        // And rank 0 waiting for a rank that never comes.
        let e = share(&addr, 0, 2, Some(&[7; 128]), 128, Duration::from_millis(300)).unwrap_err().to_string();
        assert!(e.contains("0 of the 1 other ranks"), "{e}");
    }

    #[test]
    fn the_address_comes_from_torchruns_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(address(&env(&[])).unwrap(), "127.0.0.1:29500");
        assert_eq!(address(&env(&[("MASTER_ADDR", "node7"), ("MASTER_PORT", "4000")])).unwrap(), "node7:4000");
        assert!(address(&env(&[("MASTER_PORT", "x")])).unwrap_err().to_string().contains("MASTER_PORT=x"));
    }
}
