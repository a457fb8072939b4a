//! Test helpers shared by the decoder's, the encoder's and the types' tests: contexts, hand-
//! written wire bytes, and one Relation both as bytes and as a message.

use bytes::Bytes;

use super::*;

pub(super) const V1: Context = Context::new(ProtocolVersion::V1);
pub(super) const V2: Context = Context::new(ProtocolVersion::V2);
pub(super) const V2_STREAM: Context = Context {
    proto: ProtocolVersion::V2,
    in_stream: true,
};

/// Hand-written bytes, built field by field so each test reads like the protocol docs.
#[derive(Default)]
pub(super) struct Wire(pub(super) Vec<u8>);

impl Wire {
    pub(super) fn tag(tag: u8) -> Wire {
        Wire(vec![tag])
    }
    pub(super) fn u8(mut self, v: u8) -> Wire {
        self.0.push(v);
        self
    }
    pub(super) fn i16(mut self, v: i16) -> Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn i32(mut self, v: i32) -> Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn u32(mut self, v: u32) -> Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn u64(mut self, v: u64) -> Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn i64(mut self, v: i64) -> Wire {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(super) fn str(mut self, s: &str) -> Wire {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    pub(super) fn raw(mut self, b: &[u8]) -> Wire {
        self.0.extend_from_slice(b);
        self
    }
    pub(super) fn text(self, s: &str) -> Wire {
        let len = i32::try_from(s.len()).unwrap();
        self.u8(b't').i32(len).raw(s.as_bytes())
    }
    pub(super) fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}

/// Decodes, checks re-encoding gives the same bytes, and returns the message.
pub(super) fn decode_exact(wire: Wire, ctx: Context) -> Message {
    let bytes = wire.bytes();
    let message = decode(&bytes, ctx).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        encode(&message, ctx).freeze(),
        bytes,
        "re-encoding {message:?}"
    );
    message
}

pub(super) fn decode_err(wire: Wire, ctx: Context) -> DecodeError {
    let bytes = wire.bytes();
    match decode(&bytes, ctx) {
        Ok(m) => panic!("decoded {m:?} from {bytes:?}"),
        Err(e) => e,
    }
}

pub(super) fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

pub(super) fn relation_wire(xid: Option<u32>) -> Wire {
    let mut w = Wire::tag(b'R');
    if let Some(xid) = xid {
        w = w.u32(xid);
    }
    w.u32(16_384)
        .str("app")
        .str("funds")
        .u8(b'd')
        .i16(2)
        .u8(1)
        .str("id")
        .u32(2950)
        .i32(-1)
        .u8(0)
        .str("name")
        .u32(1043)
        .i32(68)
}

pub(super) fn relation(xid: Option<u32>) -> Message {
    Message::Relation(Relation {
        xid,
        oid: 16_384,
        namespace: "app".into(),
        name: "funds".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                part_of_key: true,
                name: "id".into(),
                type_oid: 2950,
                type_modifier: -1,
            },
            Column {
                part_of_key: false,
                name: "name".into(),
                type_oid: 1043,
                type_modifier: 68,
            },
        ],
    })
}
