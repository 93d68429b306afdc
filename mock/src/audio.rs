//! Audio: transcriptions and translations of an uploaded file
//! (`multipart/form-data` with a `file` part, `model` and an optional
//! `response_format`). The answer names the backend, the file name and its
//! size: "Transcribed by NAME from FILE (N bytes)" ("Translated by ..." for
//! a translation).
//!
//! Everything here is pure (no I/O); the request checks (the deployment
//! allow-list on the path's deployment or the form's `model`), quota (one
//! request, no tokens) and faults are applied by [`crate::state`].

use bytes::Bytes;
use serde_json::{json, Value};

use crate::multipart::Form;
use crate::openai::{self, invalid_request, Operation};
use crate::state::{Refusal, ReplyBody};

/// The `response_format` values the API takes (default `json`).
const FORMATS: [&str; 5] = ["json", "text", "srt", "verbose_json", "vtt"];

/// The checks of an audio form: a `file` part and a known `response_format`.
pub fn validate(form: &Form) -> Result<(), Refusal> {
    if form.file("file").is_none() {
        return Err((400, openai::missing_parameter("file")));
    }
    match form.text("response_format") {
        Some(f) if !FORMATS.contains(&f.as_str()) => Err((
            400,
            invalid_request(
                &format!("Invalid value: '{f}'. Supported values are: {}.", FORMATS.join(", ")),
                Some("response_format"),
                Some("invalid_value"),
            ),
        )),
        _ => Ok(()),
    }
}

/// The answer's text.
pub fn text(op: Operation, name: &str, form: &Form) -> String {
    let verb = if op == Operation::AudioTranslations { "Translated" } else { "Transcribed" };
    let (filename, len) = form.file("file").map_or(("", 0), |f| (f.filename.as_deref().unwrap_or(""), f.data.len()));
    format!("{verb} by {name} from {filename} ({len} bytes)")
}

fn plain(text: String) -> ReplyBody {
    ReplyBody::Raw { content_type: "text/plain; charset=utf-8", bytes: Bytes::from(text) }
}

/// The 200 body in the requested `response_format`: `{"text"}` (json), the
/// bare text (text), a one-cue subtitle (srt, vtt), or with the task,
/// language, duration and one segment (verbose_json).
pub fn answer(op: Operation, name: &str, form: &Form) -> ReplyBody {
    let text = text(op, name, form);
    match form.text("response_format").as_deref() {
        Some("text") => plain(text),
        Some("srt") => plain(format!("1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n")),
        Some("vtt") => plain(format!("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n")),
        Some("verbose_json") => ReplyBody::Json(verbose(op, &text)),
        _ => ReplyBody::Json(json!({"text": text})),
    }
}

fn verbose(op: Operation, text: &str) -> Value {
    let task = if op == Operation::AudioTranslations { "translate" } else { "transcribe" };
    json!({
        "task": task,
        "language": "english",
        "duration": 1.0,
        "text": text,
        "segments": [{
            "id": 0, "seek": 0, "start": 0.0, "end": 1.0, "text": text, "tokens": [],
            "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multipart::tests::{httpx_body, BOUNDARY};

    fn form(fields: &[(&str, &str)]) -> Form {
        let body = httpx_body(fields, &[("file", "talk.wav", "audio/x-wav", b"RIFF\r\n\x00\xff")]);
        crate::multipart::parse(&Bytes::from(body), BOUNDARY).unwrap()
    }

    fn raw(body: ReplyBody) -> (&'static str, String) {
        match body {
            ReplyBody::Raw { content_type, bytes } => (content_type, String::from_utf8(bytes.to_vec()).unwrap()),
            other => panic!("not raw: {other:?}"),
        }
    }

    #[test]
    fn formats() {
        let op = Operation::AudioTranscriptions;
        let ReplyBody::Json(v) = answer(op, "eastus", &form(&[("model", "whisper")])) else { panic!() };
        assert_eq!(v, json!({"text": "Transcribed by eastus from talk.wav (8 bytes)"}));
        let (ct, body) = raw(answer(op, "eastus", &form(&[("response_format", "text")])));
        assert_eq!((ct, body.as_str()), ("text/plain; charset=utf-8", "Transcribed by eastus from talk.wav (8 bytes)"));
        assert!(raw(answer(op, "e", &form(&[("response_format", "vtt")]))).1.starts_with("WEBVTT\n"));
        assert!(raw(answer(op, "e", &form(&[("response_format", "srt")]))).1.contains(" --> 00:00:01,000\n"));
        let translated = Operation::AudioTranslations;
        let ReplyBody::Json(v) = answer(translated, "w", &form(&[("response_format", "verbose_json")])) else {
            panic!()
        };
        assert_eq!((&v["task"], &v["text"]), (&json!("translate"), &json!("Translated by w from talk.wav (8 bytes)")));
        assert_eq!(v["segments"][0]["text"], v["text"]);
    }

    #[test]
    fn checks() {
        assert_eq!(validate(&form(&[("model", "m")])), Ok(()));
        let (status, err) = validate(&form(&[("response_format", "mp3")])).unwrap_err();
        assert_eq!((status, &err["error"]["param"]), (400, &json!("response_format")));
        let no_file = crate::multipart::parse(&Bytes::from(httpx_body(&[("file", "text")], &[])), BOUNDARY).unwrap();
        assert_eq!(validate(&no_file), Err((400, openai::missing_parameter("file"))));
    }
}
