//! Compact JSON, as serde_json writes it, indented as serde_json's pretty
//! printer would, without reading it into values first: `status --json`
//! prints the supervisor's answer as it came, and a report of a thousand
//! instances is half a megabyte that parsing would copy into thousands of
//! small allocations only to write it out again.

use std::io::{self, Write};

/// Writes the object whose fields (compact JSON, with no whitespace
/// outside strings, after the object's opening brace: what follows
/// `{"tag":"x",` in a tagged line, say) are `fields` to `out` with
/// two-space indentation, `": "` after keys and `{}`/`[]` for empty
/// objects and arrays: byte for byte what `serde_json::to_writer_pretty`
/// writes for the same object.
pub fn write_object_fields(fields: &[u8], out: &mut impl Write) -> io::Result<()> {
    if fields == b"}" {
        return out.write_all(b"{}");
    }
    out.write_all(b"{")?;
    newline(out, 1)?;
    indent(fields, 1, out)
}

/// Indents `compact`, which begins `depth` levels deep (see
/// [`write_object_fields`]).
fn indent(compact: &[u8], mut depth: usize, out: &mut impl Write) -> io::Result<()> {
    let mut in_string = false;
    let mut escaped = false;
    // Bytes not yet written: runs without structure go out in one call.
    let mut from = 0;
    let mut i = 0;
    while i < compact.len() {
        let b = compact[i];
        if in_string {
            if escaped {
                escaped = false;
                i += 1;
                continue;
            }
            // Most of a report is strings: on to the next quote or
            // backslash at once.
            match memchr::memchr2(b'"', b'\\', &compact[i..]) {
                Some(at) => {
                    escaped = compact[i + at] == b'\\';
                    in_string = escaped;
                    i += at + 1;
                }
                None => i = compact.len(),
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                let close = if b == b'{' { b'}' } else { b']' };
                if compact.get(i + 1) == Some(&close) {
                    i += 2;
                    continue;
                }
                out.write_all(&compact[from..=i])?;
                depth += 1;
                newline(out, depth)?;
                from = i + 1;
            }
            b'}' | b']' => {
                out.write_all(&compact[from..i])?;
                depth = depth.saturating_sub(1);
                newline(out, depth)?;
                from = i;
            }
            b',' => {
                out.write_all(&compact[from..=i])?;
                newline(out, depth)?;
                from = i + 1;
            }
            b':' => {
                out.write_all(&compact[from..=i])?;
                out.write_all(b" ")?;
                from = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    out.write_all(&compact[from..])
}

fn newline(out: &mut impl Write, depth: usize) -> io::Result<()> {
    // A newline and the indentation of 32 levels, in one write.
    const LINE: &[u8; 65] = b"\n                                                                ";
    let width = depth.saturating_mul(2);
    match LINE.get(..width + 1) {
        Some(line) => out.write_all(line),
        None => {
            out.write_all(LINE)?;
            (64..width).try_for_each(|_| out.write_all(b" "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::protocol::{InstanceStatus, Response, StatusReport, WorkerStatus};

    fn pretty(v: &serde_json::Value) -> String {
        let mut out = Vec::new();
        indent(serde_json::to_string(v).unwrap().as_bytes(), 0, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn indents_as_serde_json_does() {
        let v = serde_json::json!({
            "empty_object": {},
            "empty_array": [],
            "nested": [[], [{}], [1, [2, {"a": null}]], {"b": [true, false]}],
            "tricky strings": ["a\"b", "{[,:]}", "back\\slash\\", "\\\"", "\u{1}\n\t", "ünï ✓"],
            "numbers": [0, -1, 1.5, 1e-7, 18446744073709551615u64],
        });
        assert_eq!(pretty(&v), serde_json::to_string_pretty(&v).unwrap());
        // Deeper than one run of spaces indents.
        let deep =
            (0..40).fold(serde_json::json!([1, 2]), |inner, i| serde_json::json!({ format!("k{i}"): inner }));
        assert_eq!(pretty(&deep), serde_json::to_string_pretty(&deep).unwrap());
        for scalar in
            [serde_json::json!(1), serde_json::json!("x"), serde_json::json!(null), serde_json::json!({})]
        {
            assert_eq!(pretty(&scalar), serde_json::to_string_pretty(&scalar).unwrap());
        }
    }

    #[test]
    fn a_status_report_prints_as_the_typed_printer_prints_it() {
        let mut report = StatusReport::default();
        report.supervisor.state = "running".into();
        report.supervisor.pid = Some(42);
        report.workers.push(WorkerStatus {
            name: "web \"main\"".into(),
            capacity: 2,
            state: "running".into(),
            rollout: None,
            sockets: Vec::new(),
            instances: vec![InstanceStatus {
                index: 1,
                pid: Some(4242),
                state: "running".into(),
                cpu_seconds: Some(0.25),
                rss_bytes: Some(1 << 20),
                waiting_for: vec!["db (ready)".into()],
                ..Default::default()
            }],
        });
        let expected = serde_json::to_string_pretty(&report).unwrap();
        let mut out = Vec::new();
        indent(serde_json::to_string(&report).unwrap().as_bytes(), 0, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // As the client prints the supervisor's answer: the fields after
        // the reply's tag.
        let line = serde_json::to_string(&Response::Status(Box::new(report))).unwrap();
        let fields = line.strip_prefix(Response::STATUS_TAG).expect("tagged first");
        let mut out = Vec::new();
        write_object_fields(fields.as_bytes(), &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        let mut out = Vec::new();
        write_object_fields(b"}", &mut out).unwrap();
        assert_eq!(out, b"{}");
    }
}
