//! The JSON schema of daemon.toml, generated from the raw config types, and
//! a validator built from it once.

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::raw::RawConfig;

/// The schema as a JSON value.
pub fn schema() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let mut value = generator.into_root_schema_for::<RawConfig>().to_value();
    strip_null(&mut value);
    value
}

/// TOML has no null, so an `Option<T>` key means "may be absent", never
/// "may be null". schemars writes it as `anyOf: [T, null]`, whose errors
/// say only "not valid under any of the schemas"; this turns it back into
/// plain `T` so errors name what is wrong inside it.
fn strip_null(node: &mut Value) {
    match node {
        Value::Object(map) => {
            let is_null = |v: &Value| v.get("type").and_then(Value::as_str) == Some("null");
            if let Some(Value::Array(any)) = map.get("anyOf")
                && any.len() == 2
                && let Some(keep) = any.iter().find(|v| !is_null(v)).cloned()
                && any.iter().any(is_null)
            {
                map.remove("anyOf");
                if let Value::Object(inner) = keep {
                    for (k, v) in inner {
                        map.entry(k).or_insert(v);
                    }
                }
            }
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types[0].clone();
                    map.insert("type".into(), only);
                }
            }
            map.values_mut().for_each(strip_null);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_null),
        _ => {}
    }
}

/// The schema for editors and pre-commit hooks: [`schema`] plus the rules
/// drover checks in code (with messages that say more than a schema
/// validator would) but that JSON Schema can also say, so that an editor
/// shows them as one types: exit codes 0-255, a non-empty program, exactly
/// one of a job's `command` and `steps`, not both `schedule` and `every`,
/// five cron fields, one kind per probe (`log` and `start_timeout` only in
/// `ready`, `failures` at least 1 and only in `health`), the `depends_on`
/// conditions.
pub fn published() -> Value {
    let mut value = schema();
    let Some(defs) = value.get_mut("$defs").and_then(Value::as_object_mut) else { return value };
    for def in defs.values_mut() {
        let Some(props) = def.get_mut("properties").and_then(Value::as_object_mut) else { continue };
        if let Some(codes) = props.get_mut("permanent_exit_codes").and_then(|c| c.get_mut("items")) {
            codes["minimum"] = 0.into();
            codes["maximum"] = 255.into();
        }
        if let Some(cmd) = props.get_mut("command") {
            cmd["minItems"] = 1.into();
            cmd["prefixItems"] = serde_json::json!([{ "type": "string", "minLength": 1 }]);
        }
        if let Some(cron) = props.get_mut("schedule") {
            cron["pattern"] = r"^\s*\S+(\s+\S+){4}\s*$".into();
        }
        // One probe type serves both roles: each role refuses the other's keys.
        if let Some(ready) = props.get_mut("ready") {
            ready["not"] = serde_json::json!({ "required": ["failures"] });
        }
        if let Some(health) = props.get_mut("health") {
            health["not"] = serde_json::json!({
                "anyOf": [{ "required": ["log"] }, { "required": ["start_timeout"] }]
            });
        }
    }
    if let Some(probe) = defs.get_mut("RawProbe").and_then(Value::as_object_mut) {
        let kinds = ["exec", "http", "tcp", "log", "notify"];
        probe.insert(
            "oneOf".into(),
            kinds.iter().map(|k| serde_json::json!({ "required": [k] })).collect::<Vec<_>>().into(),
        );
        if let Some(props) = probe.get_mut("properties").and_then(Value::as_object_mut) {
            if let Some(n) = props.get_mut("notify") {
                n["const"] = true.into();
            }
            if let Some(f) = props.get_mut("failures") {
                f["minimum"] = 1.into();
            }
        }
    }
    if let Some(deps) = defs.get_mut("DependsOn").and_then(Value::as_object_mut) {
        deps.insert(
            "anyOf".into(),
            serde_json::json!([
                { "type": "object", "additionalProperties": { "enum": ["started", "ready", "succeeded"] } },
                { "type": "array", "items": { "type": "string" }, "uniqueItems": true }
            ]),
        );
    }
    if let Some(job) = defs.get_mut("RawJob").and_then(Value::as_object_mut) {
        job.insert(
            "oneOf".into(),
            serde_json::json!([
                { "required": ["command"], "not": { "required": ["steps"] } },
                { "required": ["steps"], "not": { "required": ["command"] } }
            ]),
        );
        job.insert("not".into(), serde_json::json!({ "required": ["schedule", "every"] }));
    }
    value
}

/// The published schema as the pretty JSON text committed in
/// schema/daemon.schema.json.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&published()).expect("schema serializes");
    text.push('\n');
    text
}

/// The schema, generated once, for looking up keys.
pub fn cached() -> &'static Value {
    static S: OnceLock<Value> = OnceLock::new();
    S.get_or_init(schema)
}

/// The schema and its validator, made for each load rather than kept:
/// the supervisor would otherwise hold both (half a megabyte) for the
/// few milliseconds a reload needs them.
pub fn validator() -> (Value, jsonschema::Validator) {
    let s = schema();
    let v = jsonschema::options()
        .should_validate_formats(false)
        .build(&s)
        .expect("the generated schema compiles");
    (s, v)
}

/// The schema node that describes the value at `path` in a document,
/// following `$ref`s, `properties`, `additionalProperties` and `items`.
pub fn node_at<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = deref(root, root);
    for seg in path {
        node = if let Some(p) = node.get("properties").and_then(|p| p.get(seg)) {
            p
        } else if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
            ap
        } else {
            node.get("items")?
        };
        node = deref(root, node);
    }
    Some(node)
}

fn deref<'a>(root: &'a Value, mut node: &'a Value) -> &'a Value {
    for _ in 0..8 {
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) => match r.strip_prefix('#').and_then(|p| root.pointer(p)) {
                Some(target) => node = target,
                None => break,
            },
            None => break,
        }
    }
    node
}

/// The keys a table at `path` accepts, for "did you mean" hints.
pub fn keys_at(path: &[String]) -> Vec<String> {
    node_at(cached(), path)
        .and_then(|n| n.get("properties"))
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_is_strict_and_describes_keys() {
        let s = schema();
        assert_eq!(s["additionalProperties"], Value::Bool(false));
        let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let grace = node_at(&s, &path(&["defaults", "stop_grace"])).unwrap();
        assert_eq!(grace["type"], "string");
        let worker = node_at(&s, &path(&["workers", "web"])).unwrap();
        assert_eq!(worker["additionalProperties"], Value::Bool(false));
        assert!(worker["required"].as_array().unwrap().contains(&"command".into()));
        assert!(keys_at(&path(&["workers", "web", "backoff"])).contains(&"multiplier".to_string()));
        let step = node_at(&s, &path(&["jobs", "x", "steps", "0"])).unwrap();
        assert!(step["properties"].get("approve").is_some());
    }
}
