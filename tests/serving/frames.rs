//! HTTP/2 written frame by frame, for a client that breaks the rules no library client breaks:
//! more streams than the server allows, pings left unanswered.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Frame types.
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;

/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// The SETTINGS identifier of the initial stream window.
pub const INITIAL_WINDOW_SIZE: u16 = 4;

/// RST_STREAM's error code for a stream past the server's concurrent-stream limit.
pub const REFUSED_STREAM: u32 = 7;

/// One frame as read.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM frame.
    pub fn reset_code(&self) -> Option<u32> {
        (self.kind == RST_STREAM).then(|| u32::from_be_bytes(self.payload[..4].try_into().unwrap()))
    }
}

/// A client connection that writes and reads raw frames.
pub struct Connection {
    tcp: TcpStream,
}

impl Connection {
    /// Connects, sends the preface and empty SETTINGS, and acknowledges the server's SETTINGS.
    pub async fn open(addr: &str) -> Connection {
        Connection::open_with(addr, &[]).await
    }

    /// [`Connection::open`] with these SETTINGS (identifier, value).
    pub async fn open_with(addr: &str, settings: &[(u16, u32)]) -> Connection {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut c = Connection { tcp };
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()].concat())
            .collect();
        c.send(SETTINGS, 0, 0, &payload).await;
        loop {
            let f = c.read().await.expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                c.send(SETTINGS, ACK, 0, &[]).await;
                return c;
            }
        }
    }

    /// Writes one frame.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut frame = len.to_be_bytes()[1..].to_vec();
        frame.extend([kind, flags]);
        frame.extend(stream.to_be_bytes());
        frame.extend(payload);
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// Opens stream `stream` with a gRPC call of `path` and sends nothing more on it.
    pub async fn open_call(&mut self, stream: u32, path: &str) {
        let block = header_block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]);
        self.send(HEADERS, END_HEADERS, stream, &block).await;
    }

    /// Sends a unary-request call of `path` with the encoded message `message` on `stream`.
    pub async fn call(&mut self, stream: u32, path: &str, message: &[u8]) {
        self.open_call(stream, path).await;
        let mut body = vec![0];
        body.extend((message.len() as u32).to_be_bytes());
        body.extend(message);
        self.send(DATA, END_STREAM, stream, &body).await;
    }

    /// Lets the server send `bytes` more on `stream` (0: the connection).
    pub async fn open_window(&mut self, stream: u32, bytes: u32) {
        self.send(WINDOW_UPDATE, 0, stream, &bytes.to_be_bytes())
            .await;
    }

    /// The next frame, or `None` once the server has closed the connection.
    pub async fn read(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        self.tcp.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0; len];
        self.tcp.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        })
    }

    /// The frames the server sends within `wait`, until it closes the connection (`true`) or the
    /// wait ends (`false`).
    pub async fn read_for(&mut self, wait: Duration) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.read()).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return (frames, true),
                Err(_) => return (frames, false),
            }
        }
    }
}

/// HPACK: each header as a literal without indexing, with a literal name, no Huffman coding.
fn header_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in headers {
        block.push(0);
        for s in [name, value] {
            assert!(s.len() < 127, "one-byte HPACK lengths only");
            block.push(s.len() as u8);
            block.extend(s.as_bytes());
        }
    }
    block
}

/// The gRPC messages the DATA frames of `stream` among `frames` carry, each as its encoded bytes.
pub fn messages(frames: &[Frame], stream: u32) -> Vec<Vec<u8>> {
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA && f.stream == stream)
        .flat_map(|f| f.payload.iter().copied())
        .collect();
    let mut out = Vec::new();
    let mut rest = &body[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        out.push(rest[5..5 + len].to_vec());
        rest = &rest[5 + len..];
    }
    out
}
