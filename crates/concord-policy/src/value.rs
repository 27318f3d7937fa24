//! The per-field value codec replicas store and compare values with: one field's value encoded
//! as a message of the entity's type holding only that field, protobuf unknown fields stripped
//! at every depth.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

/// The encoded form of one field value, as replicas store and compare it: a message of the
/// entity's type with only that field set. `None` when the field is not set.
pub fn encode_field(record: &DynamicMessage, field: &FieldDescriptor) -> Option<Vec<u8>> {
    if !record.has_field(field) {
        return None;
    }
    let mut one = DynamicMessage::new(record.descriptor());
    let mut value = record.get_field(field).into_owned();
    strip_unknown_value(&mut value);
    one.set_field(field, value);
    Some(one.encode_to_vec())
}

/// Decodes a value stored by [`encode_field`].
pub fn decode_field(
    message: &MessageDescriptor,
    field: &FieldDescriptor,
    bytes: &[u8],
) -> Option<Value> {
    let m = DynamicMessage::decode(message.clone(), bytes).ok()?;
    m.has_field(field).then(|| m.get_field(field).into_owned())
}

/// Removes every protobuf unknown field from `v`, at every depth.
pub(crate) fn strip_unknown_value(v: &mut Value) {
    match v {
        Value::Message(m) => strip_unknown(m),
        Value::List(items) => items.iter_mut().for_each(strip_unknown_value),
        Value::Map(map) => map.values_mut().for_each(strip_unknown_value),
        _ => {}
    }
}

fn strip_unknown(msg: &mut DynamicMessage) {
    msg.take_unknown_fields().for_each(drop);
    for (_, v) in msg.fields_mut() {
        strip_unknown_value(v);
    }
}
