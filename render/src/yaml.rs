//! YAML output. A small emitter rather than a YAML library: every string
//! is written double-quoted in JSON syntax (valid YAML), so no value can
//! change type on the way (`"on"`, `"1.0"`, `"0x10"` stay strings for YAML
//! 1.1 parsers too), and the output is stable byte for byte, which the
//! committed rendered configs are checked against. `serde_yaml`, the usual
//! choice, is archived upstream; the round-trip test below reads the output
//! back with a maintained parser to prove it means what the JSON means.

use serde_json::Value;

/// YAML for a JSON value: block style, strings always double-quoted (JSON
/// string syntax is valid YAML), so no value can change type on the way.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(a) if a.is_empty() => "[]".to_string(),
        Value::Object(o) if o.is_empty() => "{}".to_string(),
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = Value::String(k.clone()).to_string();
                if is_block(v) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    write_yaml(v, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(v)));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if is_block(item) {
                    // First line of the item shares the dash.
                    let mut inner = String::new();
                    write_yaml(item, indent + 2, &mut inner);
                    let trimmed = inner.get(indent + 2..).unwrap_or("");
                    out.push_str(&format!("{pad}- {trimmed}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_yaml_parser_reads_back_the_same_value() {
        let v = json!({
            "strings": ["on", "yes", "1.0", "0x10", "~", "null", "", "a: b", "# not a comment", "line\nbreak", "'q'"],
            "numbers": [0, -1, 2.5, 1e300],
            "bools": [true, false],
            "null": null,
            "nested": [{"a": [[1, {"b": {}}], []]}, {"c": {"d": [{"e": "f"}]}}],
            "weird key: x": {"\"quoted\"": 1},
        });
        let back: Value = serde_yaml_ng::from_str(&to_yaml(&v)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn yaml_quotes_strings_and_nests_lists() {
        let v = json!({"a": [{"b": 1, "c": "x: y"}, 2], "d": {}, "e": "true"});
        assert_eq!(to_yaml(&v), "\"a\":\n  - \"b\": 1\n    \"c\": \"x: y\"\n  - 2\n\"d\": {}\n\"e\": \"true\"\n");
    }
}
