//! A blocking event-stream reader over a raw socket, written to the
//! WHATWG `EventSource` parsing rules (fields `event`, `data`, `id`,
//! `retry`; `:` comments; an event ends at a blank line), so the tests see
//! what a browser would dispatch.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::IO_TIMEOUT;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `message` when the event named none.
    pub event: String,
    pub data: String,
    /// The last event id after this event (ids persist across events).
    pub id: Option<String>,
}

impl Event {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }
}

pub struct Sse {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body of a refusal (status not 200).
    pub body: String,
    pub last_id: Option<String>,
    pub retry: Option<u64>,
    /// Comments seen (heartbeats).
    pub comments: usize,
}

impl Sse {
    /// `GET path` with `extra_headers` (each ending in `\r\n`).
    pub fn open(addr: SocketAddr, path: &str, extra_headers: &str) -> Sse {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra_headers}\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut headers = Vec::new();
        let mut length = None;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            let (name, value) = trimmed.split_once(':').unwrap();
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_string());
            if name == "content-length" {
                length = value.parse::<usize>().ok();
            }
            headers.push((name, value));
        }
        let mut body = String::new();
        if status != 200 {
            let mut bytes = vec![0; length.unwrap_or(0)];
            reader.read_exact(&mut bytes).unwrap();
            body = String::from_utf8_lossy(&bytes).into_owned();
        }
        Sse {
            reader,
            status,
            headers,
            body,
            last_id: None,
            retry: None,
            comments: 0,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next event, or `None` at the end of the stream.
    pub fn next(&mut self) -> Option<Event> {
        let (mut event, mut data, mut has_data) = (String::new(), String::new(), false);
        let mut line = String::new();
        loop {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading the event stream: {e}"),
            }
            let text = line.strip_suffix('\n').unwrap_or(&line);
            let text = text.strip_suffix('\r').unwrap_or(text);
            if text.is_empty() {
                if !has_data {
                    event.clear();
                    continue;
                }
                return Some(Event {
                    event: if event.is_empty() {
                        "message".into()
                    } else {
                        event
                    },
                    data,
                    id: self.last_id.clone(),
                });
            }
            if text.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = text.split_once(':').unwrap_or((text, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => {
                    if has_data {
                        data.push('\n');
                    }
                    data.push_str(value);
                    has_data = true;
                }
                "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
                "retry" => self.retry = value.parse().ok(),
                _ => {}
            }
        }
    }

    /// The next event that is not one of ringcast's own
    /// (`ringcast.subscribed`, ...).
    pub fn next_push(&mut self) -> Event {
        loop {
            let event = self.next().expect("the stream ended");
            if !event.event.starts_with("ringcast.") {
                return event;
            }
        }
    }

    /// Reads events until `event` arrives.
    pub fn expect(&mut self, name: &str) -> Event {
        loop {
            let event = self
                .next()
                .unwrap_or_else(|| panic!("the stream ended before `{name}`"));
            if event.event == name {
                return event;
            }
        }
    }

    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .unwrap();
    }

    pub fn shutdown(&self) {
        let _ = self.reader.get_ref().shutdown(std::net::Shutdown::Both);
    }
}
