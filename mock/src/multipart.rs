//! `multipart/form-data` request bodies (RFC 7578), as the `openai` SDK
//! (through httpx) sends file uploads, audio and image edits:
//!
//! ```text
//! --BOUNDARY\r\n
//! Content-Disposition: form-data; name="purpose"\r\n
//! \r\n
//! batch\r\n
//! --BOUNDARY\r\n
//! Content-Disposition: form-data; name="file"; filename="batch.jsonl"\r\n
//! Content-Type: application/octet-stream\r\n
//! \r\n
//! <any bytes, CRLFs included>\r\n
//! --BOUNDARY--\r\n
//! ```
//!
//! A part's content ends where `\r\n--BOUNDARY` starts (the boundary is
//! chosen so that it does not occur in any content). Parameter values may be
//! quoted strings with backslash escapes; httpx also writes a `"` inside a
//! file name as `%22`, decoded here.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value};

/// One part of a form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    /// Set for a file part.
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub data: Bytes,
}

impl Part {
    /// What the stats show of the part: a text field's value, or for a file
    /// `<filename> (<N> bytes)`.
    fn shown(&self) -> String {
        match &self.filename {
            Some(filename) => format!("{filename} ({} bytes)", self.data.len()),
            None => String::from_utf8_lossy(&self.data).into_owned(),
        }
    }
}

/// A parsed `multipart/form-data` body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form {
    pub parts: Vec<Part>,
}

impl Form {
    /// The form a request carries: its `content-type` is
    /// `multipart/form-data` with a boundary and its body parses; else `None`.
    pub fn from_request(headers: &BTreeMap<String, String>, body: &Bytes) -> Option<Form> {
        parse(body, &boundary(headers.get("content-type")?)?)
    }

    /// The first text field (not a file) called `name`.
    pub fn text(&self, name: &str) -> Option<String> {
        self.parts.iter().find(|p| p.name == name && p.filename.is_none()).map(Part::shown)
    }

    /// The first file part called `name`.
    pub fn file(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name && p.filename.is_some())
    }

    /// A JSON object of the fields, for stats and for the checks that read a
    /// body's fields (`model`): text fields as strings, files as
    /// `"<filename> (<N> bytes)"`; a repeated name (`image[]`) gives an array.
    pub fn summary(&self) -> Value {
        let mut map = Map::new();
        for part in &self.parts {
            let shown = Value::String(part.shown());
            match map.get_mut(&part.name) {
                None => {
                    map.insert(part.name.clone(), shown);
                }
                Some(Value::Array(items)) => items.push(shown),
                Some(first) => *first = Value::Array(vec![first.take(), shown]),
            }
        }
        Value::Object(map)
    }

    /// Bytes of the text fields (the size of what [`Form::summary`] keeps).
    pub fn text_len(&self) -> usize {
        self.parts.iter().filter(|p| p.filename.is_none()).map(|p| p.data.len()).sum()
    }
}

/// The boundary of a `multipart/form-data` content type (quoted or not).
pub fn boundary(content_type: &str) -> Option<String> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let value = params_of(params).into_iter().find(|(k, _)| k.eq_ignore_ascii_case("boundary"))?.1;
    (!value.is_empty() && value.len() <= 200).then_some(value)
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|p| p + from)
}

/// Parse a body; `None` when it is not a well-formed form.
pub fn parse(body: &Bytes, boundary: &str) -> Option<Form> {
    let delimiter = format!("--{boundary}").into_bytes();
    let next = [b"\r\n".as_slice(), &delimiter].concat();
    // The first delimiter opens the body, or ends a preamble.
    let first = if body.starts_with(&delimiter) { 0 } else { find(body, &next, 0)? + 2 };
    let mut pos = first + delimiter.len();
    let mut form = Form::default();
    loop {
        if body.get(pos..)?.starts_with(b"--") {
            return Some(form);
        }
        // Transport padding, then the end of the delimiter line.
        let line_end = find(body, b"\r\n", pos)?;
        if !body.get(pos..line_end)?.iter().all(|b| matches!(b, b' ' | b'\t')) {
            return None;
        }
        let head_start = line_end + 2;
        let (head, content_start) = if body.get(head_start..)?.starts_with(b"\r\n") {
            ("", head_start + 2)
        } else {
            let head_end = find(body, b"\r\n\r\n", head_start)?;
            (std::str::from_utf8(body.get(head_start..head_end)?).ok()?, head_end + 4)
        };
        let content_end = find(body, &next, content_start)?;
        form.parts.push(part(head, body.slice(content_start..content_end))?);
        pos = content_end + next.len();
    }
}

/// A part from its header lines and content; `None` without a
/// `Content-Disposition: form-data` naming it.
fn part(head: &str, data: Bytes) -> Option<Part> {
    let mut disposition = None;
    let mut content_type = None;
    for line in head.split("\r\n") {
        let (name, value) = line.split_once(':')?;
        if name.trim().eq_ignore_ascii_case("content-disposition") {
            disposition = Some(value.trim());
        } else if name.trim().eq_ignore_ascii_case("content-type") {
            content_type = Some(value.trim().to_string());
        }
    }
    let (kind, params) = disposition?.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    let params = params_of(params);
    let param = |key: &str| params.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.clone());
    let filename = param("filename").map(|f| f.replace("%22", "\""));
    Some(Part { name: param("name")?, filename, content_type, data })
}

/// `; key=value; key="quoted \"value\""` → (key, value) pairs.
fn params_of(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ';' || c.is_whitespace()).is_some() {}
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ';')).collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.next_if_eq(&'=').is_some() {
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next().filter(|c| *c != '"') {
                    value.push(if c == '\\' { chars.next().unwrap_or('\\') } else { c });
                }
            } else {
                value.extend(std::iter::from_fn(|| chars.next_if(|c| *c != ';')));
                value.truncate(value.trim_end().len());
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use serde_json::json;

    pub const BOUNDARY: &str = "ab23885e0cbe039683edbd5d75463b8f";

    /// A form body byte for byte as httpx (and so the `openai` SDK) builds
    /// one: `fields` are text fields, `files` are (name, filename, content
    /// type, bytes).
    pub fn httpx_body(fields: &[(&str, &str)], files: &[(&str, &str, &str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, value) in fields {
            let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n");
            body.extend_from_slice(head.as_bytes());
            body.extend_from_slice(value.as_bytes());
            body.extend_from_slice(b"\r\n");
        }
        for (name, filename, content_type, data) in files {
            let filename = filename.replace('"', "%22");
            let head = format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            );
            body.extend_from_slice(head.as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    pub fn content_type() -> String {
        format!("multipart/form-data; boundary={BOUNDARY}")
    }

    /// Binary content with CRLFs, a lone `--`, and a near-delimiter.
    const AUDIO: &[u8] = b"RIFF\x00\r\n--\xff\r\n\r\n--ab23885e0cbe\r\n";

    #[test]
    fn parses_what_httpx_sends() {
        // Captured from `client.audio.transcriptions.create(...)` with httpx 0.28.
        let body = httpx_body(&[("model", "whisper")], &[("file", "a b\".wav", "audio/x-wav", AUDIO)]);
        let headers = BTreeMap::from([("content-type".to_string(), content_type())]);
        let form = Form::from_request(&headers, &Bytes::from(body)).unwrap();
        assert_eq!(form.parts.len(), 2);
        assert_eq!(form.text("model").as_deref(), Some("whisper"));
        let file = form.file("file").unwrap();
        assert_eq!((file.filename.as_deref(), file.content_type.as_deref()), (Some("a b\".wav"), Some("audio/x-wav")));
        assert_eq!(file.data.as_ref(), AUDIO);
        assert_eq!(form.text("file"), None, "a file is not a text field");
        assert_eq!(form.summary(), json!({"model": "whisper", "file": "a b\".wav (30 bytes)"}));
        assert_eq!(form.text_len(), 7);
    }

    #[test]
    fn repeated_names_and_empty_values() {
        let body = httpx_body(
            &[("prompt", ""), ("model", "m")],
            &[("image[]", "a.png", "image/png", b"x"), ("image[]", "b.png", "image/png", b"\r\n")],
        );
        let form = parse(&Bytes::from(body), BOUNDARY).unwrap();
        assert_eq!(
            form.summary(),
            json!({"prompt": "", "model": "m", "image[]": ["a.png (1 bytes)", "b.png (2 bytes)"]})
        );
        assert_eq!(form.file("image[]").unwrap().data.as_ref(), b"x");
    }

    #[test]
    fn boundaries() {
        assert_eq!(boundary(&content_type()).as_deref(), Some(BOUNDARY));
        assert_eq!(boundary("Multipart/Form-Data; charset=utf-8; Boundary=\"a b;c\"").as_deref(), Some("a b;c"));
        for bad in
            ["multipart/form-data", "multipart/form-data; boundary=", "multipart/mixed; boundary=x", "text/plain"]
        {
            assert_eq!(boundary(bad), None, "{bad}");
        }
    }

    #[test]
    fn preamble_no_headers_and_quoting() {
        let body = "preamble\r\n--x\r\n\r\nno headers\r\n--x  \r\ncontent-disposition: FORM-DATA; filename=\"q\\\"\\\\.txt\"; name=f\r\n\r\n\r\n--x--";
        let form = parse(&Bytes::from(body), "x");
        assert_eq!(form, None, "a part without Content-Disposition is refused");
        let body =
            "preamble\r\n--x\r\ncontent-disposition: FORM-DATA; filename=\"q\\\"\\\\;.txt\"; name=f\r\n\r\n\r\n--x--";
        let form = parse(&Bytes::from(body), "x").unwrap();
        let part = &form.parts[0];
        assert_eq!((part.name.as_str(), part.filename.as_deref(), part.data.len()), ("f", Some("q\"\\;.txt"), 0));
    }

    #[test]
    fn malformed_bodies() {
        let ok = httpx_body(&[("a", "1")], &[]);
        assert!(parse(&Bytes::from(ok.clone()), BOUNDARY).is_some());
        for cut in [10, ok.len() - 4, ok.len() - 9] {
            assert_eq!(parse(&Bytes::copy_from_slice(&ok[..cut]), BOUNDARY), None, "cut at {cut}");
        }
        assert_eq!(parse(&Bytes::from(ok), "other"), None);
        let no_disposition = format!("--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n");
        assert_eq!(parse(&Bytes::from(no_disposition), BOUNDARY), None);
        let garbage_after_delimiter = format!("--{BOUNDARY}x\r\n\r\nx\r\n--{BOUNDARY}--\r\n");
        assert_eq!(parse(&Bytes::from(garbage_after_delimiter), BOUNDARY), None);
        let json = BTreeMap::from([("content-type".to_string(), "application/json".to_string())]);
        assert_eq!(Form::from_request(&json, &Bytes::from_static(b"{}")), None);
    }
}
