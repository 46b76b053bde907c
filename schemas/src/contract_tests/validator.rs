//! The subset of JSON Schema the contracts use, checked against serialised values:
//! types, required and undeclared fields, enums, formats, `$ref`, `oneOf`/`anyOf`.

use super::*;

pub(super) fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("contract file is valid JSON")
}

/// The target of a `$ref` of the form `#/$defs/Name`.
pub(super) fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let name = reference.strip_prefix("#/$defs/")?;
    root.get("$defs")?.get(name)
}

/// Follow `$ref`s until a schema without one (at most a few hops).
pub(super) fn deref<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut s = schema;
    for _ in 0..16 {
        match s.get("$ref").and_then(Value::as_str).and_then(|r| resolve(root, r)) {
            Some(target) => s = target,
            None => break,
        }
    }
    s
}

pub(super) fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

pub(super) fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_number() && is_integer(v),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// JSON equality with numbers compared by value (1 == 1.0).
pub(super) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Validate `v` against `schema` (a node of `root`); errors name the JSON path.
pub(super) fn validate(schema: &Value, root: &Value, v: &Value, path: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(allowed) = schema.as_bool() {
        if !allowed {
            errs.push(format!("{path}: no value is allowed here"));
        }
        return errs;
    }
    let Some(s) = schema.as_object() else {
        errs.push(format!("{path}: schema node is not an object: {schema}"));
        return errs;
    };

    if let Some(r) = s.get("$ref") {
        match r.as_str().and_then(|r| resolve(root, r)) {
            Some(target) => errs.extend(validate(target, root, v, path)),
            None => errs.push(format!("{path}: unresolvable $ref {r}")),
        }
    }

    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.is_empty() {
            errs.push(format!("{path}: bad \"type\" in schema: {t}"));
        } else if !types.iter().any(|t| type_matches(t, v)) {
            errs.push(format!("{path}: expected type {t}, found {} {v}", kind_of(v)));
        }
    }

    if let Some(c) = s.get("const") {
        if !json_eq(c, v) {
            errs.push(format!("{path}: expected constant {c}, found {v}"));
        }
    }

    if let Some(e) = s.get("enum") {
        match e.as_array() {
            Some(options) => {
                if !options.iter().any(|o| json_eq(o, v)) {
                    errs.push(format!("{path}: {v} is not one of {e}"));
                }
            }
            None => errs.push(format!("{path}: bad \"enum\" in schema: {e}")),
        }
    }

    if let Some(min) = s.get("minimum") {
        match (min.as_f64(), v.as_f64()) {
            (Some(min), Some(x)) if x < min => errs.push(format!("{path}: {v} is below the minimum {min}")),
            (None, _) => errs.push(format!("{path}: bad \"minimum\" in schema: {min}")),
            _ => {}
        }
    }

    if let Some(obj) = v.as_object() {
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(name) {
                    errs.push(format!("{path}: missing required property \"{name}\""));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(props) = props {
            for (k, sub) in props {
                if let Some(val) = obj.get(k) {
                    errs.extend(validate(sub, root, val, &format!("{path}.{k}")));
                }
            }
        }
        if let Some(additional) = s.get("additionalProperties") {
            for (k, val) in obj {
                if props.is_some_and(|p| p.contains_key(k)) {
                    continue;
                }
                let p = format!("{path}.{k}");
                if additional.as_bool() == Some(false) {
                    errs.push(format!("{p}: property not allowed (additionalProperties: false)"));
                } else {
                    errs.extend(validate(additional, root, val, &p));
                }
            }
        }
    }

    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            errs.extend(validate(items, root, item, &format!("{path}[{i}]")));
        }
    }

    errs
}

/// Properties `v` serializes that the contract does not declare, recursively through
/// nested objects whose schema has "properties" (whatever additionalProperties says).
/// This is the drift check: a field added to a Rust type must be added to the contract.
pub(super) fn undeclared(schema: &Value, root: &Value, v: &Value, path: &str) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    if let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), v.as_object()) {
        for (k, val) in obj {
            let p = format!("{path}.{k}");
            match props.get(k) {
                Some(sub) => errs.extend(undeclared(sub, root, val, &p)),
                None => errs.push(format!("{p}: serialized by the Rust type but not declared in the contract")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            errs.extend(undeclared(items, root, item, &format!("{path}[{i}]")));
        }
    }
    errs
}

/// The union of the keys of an array's objects (first value of each key wins).
pub(super) fn merge_items(arr: &[Value]) -> Value {
    let mut merged = Map::new();
    for item in arr {
        if let Some(obj) = item.as_object() {
            for (k, val) in obj {
                merged.entry(k.clone()).or_insert_with(|| val.clone());
            }
        }
    }
    Value::Object(merged)
}

/// Properties the contract declares that a fully populated value does not serialize
/// (a field removed or renamed in Rust, or a typo in the contract). Array items are
/// checked against the union of the elements' keys.
pub(super) fn not_serialized(schema: &Value, root: &Value, full: &Value, path: &str) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    if let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), full.as_object()) {
        for (k, sub) in props {
            let p = format!("{path}.{k}");
            match obj.get(k) {
                Some(val) => errs.extend(not_serialized(sub, root, val, &p)),
                None => errs.push(format!("{p}: declared in the contract but not serialized by a full value")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), full.as_array()) {
        if !arr.is_empty() {
            errs.extend(not_serialized(items, root, &merge_items(arr), &format!("{path}[]")));
        }
    }
    errs
}

/// `required` of each object node must list exactly the keys a minimal value
/// serializes, except `defaulted` paths: always serialized, but optional on input.
pub(super) fn required_mismatch(schema: &Value, root: &Value, minimal: &Value, path: &str, defaulted: &[&str]) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), minimal.as_object()) else {
        return errs;
    };
    let required: BTreeSet<&str> = s
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let serialized: BTreeSet<&str> =
        obj.keys().map(String::as_str).filter(|k| !defaulted.contains(&format!("{path}.{k}").as_str())).collect();
    if required != serialized {
        errs.push(format!("{path}: \"required\" is {required:?} but a minimal value always serializes {serialized:?}"));
    }
    for (k, val) in obj {
        if let Some(sub) = props.get(k) {
            errs.extend(required_mismatch(sub, root, val, &format!("{path}.{k}"), defaulted));
        }
    }
    errs
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("contract types serialize")
}

/// Validation and the undeclared-property check of one value.
pub(super) fn check_value(contract: &str, v: &Value) -> Vec<String> {
    let root = parse(contract);
    let mut errs = validate(&root, &root, v, "$");
    errs.extend(undeclared(&root, &root, v, "$"));
    errs
}

/// A full and a minimal value of a type against its contract: both valid, nothing
/// undeclared, everything declared serialized by the full one, `required` exact.
pub(super) fn check_contract<T: Serialize>(name: &str, contract: &str, full: &T, minimal: &T, defaulted: &[&str]) {
    let root = parse(contract);
    let (full, minimal) = (to_json(full), to_json(minimal));
    let mut errs = Vec::new();
    for (what, v) in [("full", &full), ("minimal", &minimal)] {
        errs.extend(check_value(contract, v).into_iter().map(|e| format!("{what}: {e}")));
    }
    errs.extend(not_serialized(&root, &root, &full, "$"));
    errs.extend(required_mismatch(&root, &root, &minimal, "$", defaulted));
    assert!(errs.is_empty(), "{name} does not match its Rust type:\n  {}", errs.join("\n  "));
}
