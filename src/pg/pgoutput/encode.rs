//! [`Message`] → pgoutput bytes, exactly as PostgreSQL writes them: what packs and the spool
//! store, and what tests, fuzzing and fake servers send.
//!
//! It must never write a payload that [`super::decode`] would refuse in the same context: a message
//! the context cannot carry (an xid outside a streamed block, too many columns, a NUL in a name) is
//! a bug in the caller and panics (see [`encode`]). The property tests below hold the two
//! directions to each other: `decode(encode(m)) == m`.

use bytes::{BufMut, BytesMut};

use super::*;

/// Encodes `message` exactly as PostgreSQL would send it in `ctx`.
///
/// # Panics
/// If `message` cannot be sent in `ctx` — the mistakes [`decode`] would reject: an xid present
/// outside a streamed block or missing inside one, a message the context refuses, more than
/// [`MAX_COLUMNS`] columns, a name containing NUL, a value longer than `i32::MAX` bytes.
/// These are bugs in the caller (a test or a fake server), never a property of input data.
#[must_use]
pub fn encode(message: &Message, ctx: Context) -> BytesMut {
    let tag = message.tag();
    if let Some(reason) = ctx.refuses(tag) {
        panic!("cannot encode {} in {ctx:?}: {reason}", TagName(Some(tag)));
    }
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(tag);
    let streamed_xid = |out: &mut BytesMut, xid: Option<Xid>| {
        assert_eq!(
            xid.is_some(),
            ctx.carries_xid(),
            "{}: an xid is present exactly inside a streamed block of protocol 2 ({ctx:?})",
            TagName(Some(tag))
        );
        if let Some(xid) = xid {
            out.put_u32(xid);
        }
    };
    match message {
        Message::Begin(m) => {
            out.put_u64(m.final_lsn.0);
            out.put_i64(m.commit_time.0);
            out.put_u32(m.xid);
        }
        Message::Commit(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        Message::Origin(m) => {
            out.put_u64(m.lsn.0);
            put_cstring(&mut out, &m.name);
        }
        Message::Relation(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.oid);
            put_cstring(&mut out, &m.namespace);
            put_cstring(&mut out, &m.name);
            out.put_u8(m.replica_identity.to_byte());
            put_column_count(&mut out, m.columns.len());
            for column in &m.columns {
                out.put_u8(u8::from(column.part_of_key));
                put_cstring(&mut out, &column.name);
                out.put_u32(column.type_oid);
                out.put_i32(column.type_modifier);
            }
        }
        Message::Type(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.oid);
            put_cstring(&mut out, &m.namespace);
            put_cstring(&mut out, &m.name);
        }
        Message::Insert(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            out.put_u8(b'N');
            put_tuple(&mut out, &m.new);
        }
        Message::Update(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            if let Some(old) = &m.old {
                out.put_u8(old.kind_byte());
                put_tuple(&mut out, old.tuple());
            }
            out.put_u8(b'N');
            put_tuple(&mut out, &m.new);
        }
        Message::Delete(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            out.put_u8(m.old.kind_byte());
            put_tuple(&mut out, m.old.tuple());
        }
        Message::Truncate(m) => {
            streamed_xid(&mut out, m.xid);
            put_length(&mut out, m.relations.len(), "relation count");
            let mut options = 0;
            if m.cascade {
                options |= TRUNCATE_CASCADE;
            }
            if m.restart_identity {
                options |= TRUNCATE_RESTART_IDENTITY;
            }
            out.put_u8(options);
            for oid in &m.relations {
                out.put_u32(*oid);
            }
        }
        Message::LogicalMessage(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u8(u8::from(m.transactional));
            out.put_u64(m.lsn.0);
            put_cstring(&mut out, &m.prefix);
            put_length(&mut out, m.content.len(), "content length");
            out.put_slice(&m.content);
        }
        Message::StreamStart(m) => {
            out.put_u32(m.xid);
            out.put_u8(u8::from(m.first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit(m) => {
            out.put_u32(m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        Message::StreamAbort(m) => {
            out.put_u32(m.xid);
            out.put_u32(m.subxid);
        }
    }
    out
}

fn put_cstring(out: &mut BytesMut, s: &str) {
    assert!(
        !s.contains('\0'),
        "a pgoutput name cannot contain NUL: {s:?}"
    );
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_length(out: &mut BytesMut, len: usize, field: &str) {
    let len = i32::try_from(len).unwrap_or_else(|_| panic!("{field} {len} exceeds i32::MAX"));
    out.put_i32(len);
}

fn put_column_count(out: &mut BytesMut, count: usize) {
    assert!(
        count <= MAX_COLUMNS,
        "{count} columns, more than PostgreSQL's maximum of {MAX_COLUMNS}"
    );
    out.put_u16(u16::try_from(count).expect("MAX_COLUMNS fits in a u16"));
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    put_column_count(out, tuple.0.len());
    for value in &tuple.0 {
        match value {
            Value::Null => out.put_u8(b'n'),
            Value::UnchangedToast => out.put_u8(b'u'),
            Value::Text(bytes) => put_value(out, b't', bytes),
            Value::Binary(bytes) => put_value(out, b'b', bytes),
        }
    }
}

fn put_value(out: &mut BytesMut, kind: u8, bytes: &[u8]) {
    out.put_u8(kind);
    put_length(out, bytes.len(), "value length");
    out.put_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::super::testing::{V1, V2, V2_STREAM, relation};
    use super::*;

    #[test]
    #[should_panic(expected = "xid is present exactly inside a streamed block")]
    fn encoding_a_streamed_xid_outside_a_stream_is_a_bug() {
        let _ = encode(&relation(Some(1)), V2);
    }

    #[test]
    #[should_panic(expected = "StreamStop outside a streamed block")]
    fn encoding_a_message_the_context_refuses_is_a_bug() {
        let _ = encode(&Message::StreamStop, V2);
    }

    mod properties {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        /// Bounded so every `cargo test` runs them: about 0.3 s for all four in a debug build.
        /// Open-ended searching is the fuzz target's job (fuzz/).
        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 2048,
                // Minimal failing cases are printed; no regression files land in src/.
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn contexts() -> impl Strategy<Value = Context> {
            prop_oneof![Just(V1), Just(V2), Just(V2_STREAM)]
        }

        fn name() -> impl Strategy<Value = String> {
            "[^\\x00]{0,12}"
        }

        fn payload() -> impl Strategy<Value = Bytes> {
            vec(any::<u8>(), 0..48).prop_map(Bytes::from)
        }

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                Just(Value::UnchangedToast),
                payload().prop_map(Value::Text),
                payload().prop_map(Value::Binary),
            ]
        }

        fn tuple() -> impl Strategy<Value = Tuple> {
            vec(value(), 0..6).prop_map(Tuple)
        }

        fn old_tuple() -> impl Strategy<Value = OldTuple> {
            prop_oneof![
                tuple().prop_map(OldTuple::Key),
                tuple().prop_map(OldTuple::Full)
            ]
        }

        fn lsn() -> impl Strategy<Value = Lsn> {
            any::<u64>().prop_map(Lsn)
        }

        fn time() -> impl Strategy<Value = PgTimestamp> {
            any::<i64>().prop_map(PgTimestamp)
        }

        fn column() -> impl Strategy<Value = Column> {
            (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
                |(part_of_key, name, type_oid, type_modifier)| Column {
                    part_of_key,
                    name,
                    type_oid,
                    type_modifier,
                },
            )
        }

        fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
            prop_oneof![
                Just(ReplicaIdentity::Default),
                Just(ReplicaIdentity::Nothing),
                Just(ReplicaIdentity::Full),
                Just(ReplicaIdentity::Index),
            ]
        }

        /// Messages that can appear in `ctx`, with an xid exactly where `ctx` carries one.
        fn message(ctx: Context) -> BoxedStrategy<Message> {
            let xid = if ctx.carries_xid() {
                any::<u32>().prop_map(Some).boxed()
            } else {
                Just(None).boxed()
            };
            let data = prop_oneof![
                (lsn(), name()).prop_map(|(lsn, name)| Message::Origin(Origin { lsn, name })),
                (
                    xid.clone(),
                    any::<u32>(),
                    name(),
                    name(),
                    replica_identity(),
                    vec(column(), 0..5)
                )
                    .prop_map(
                        |(xid, oid, namespace, name, replica_identity, columns)| {
                            Message::Relation(Relation {
                                xid,
                                oid,
                                namespace,
                                name,
                                replica_identity,
                                columns,
                            })
                        }
                    ),
                (xid.clone(), any::<u32>(), name(), name()).prop_map(
                    |(xid, oid, namespace, name)| Message::Type(Type {
                        xid,
                        oid,
                        namespace,
                        name,
                    })
                ),
                (xid.clone(), any::<u32>(), tuple()).prop_map(|(xid, relation, new)| {
                    Message::Insert(Insert { xid, relation, new })
                }),
                (
                    xid.clone(),
                    any::<u32>(),
                    proptest::option::of(old_tuple()),
                    tuple()
                )
                    .prop_map(|(xid, relation, old, new)| {
                        Message::Update(Update {
                            xid,
                            relation,
                            old,
                            new,
                        })
                    }),
                (xid.clone(), any::<u32>(), old_tuple()).prop_map(|(xid, relation, old)| {
                    Message::Delete(Delete { xid, relation, old })
                }),
                (
                    xid.clone(),
                    any::<bool>(),
                    any::<bool>(),
                    vec(any::<u32>(), 0..6)
                )
                    .prop_map(|(xid, cascade, restart_identity, relations)| {
                        Message::Truncate(Truncate {
                            xid,
                            cascade,
                            restart_identity,
                            relations,
                        })
                    }),
                (xid, any::<bool>(), lsn(), name(), payload()).prop_map(
                    |(xid, transactional, lsn, prefix, content)| {
                        Message::LogicalMessage(LogicalMessage {
                            xid,
                            transactional,
                            lsn,
                            prefix,
                            content,
                        })
                    }
                ),
            ];
            let begin_commit = prop_oneof![
                (lsn(), time(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                    Message::Begin(Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    })
                }),
                (any::<u8>(), lsn(), lsn(), time()).prop_map(
                    |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                ),
            ];
            let stream_boundaries = prop_oneof![
                (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                    Message::StreamStart(StreamStart { xid, first_segment })
                }),
                (any::<u32>(), any::<u8>(), lsn(), lsn(), time()).prop_map(
                    |(xid, flags, commit_lsn, end_lsn, commit_time)| {
                        Message::StreamCommit(StreamCommit {
                            xid,
                            flags,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                        })
                    }
                ),
                (any::<u32>(), any::<u32>())
                    .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid })),
            ];
            match (ctx.proto, ctx.in_stream) {
                (ProtocolVersion::V1, _) => prop_oneof![data, begin_commit].boxed(),
                (ProtocolVersion::V2, false) => {
                    prop_oneof![data, begin_commit, stream_boundaries].boxed()
                }
                (ProtocolVersion::V2, true) => {
                    prop_oneof![4 => data, 1 => Just(Message::StreamStop)].boxed()
                }
            }
        }

        fn context_and_message() -> impl Strategy<Value = (Context, Message)> {
            contexts().prop_flat_map(|ctx| (Just(ctx), message(ctx)))
        }

        /// Decoding any bytes either fails or yields a message that encodes to those bytes.
        fn decodes_canonically_or_fails(bytes: &Bytes, ctx: Context) -> Result<(), TestCaseError> {
            if let Ok(message) = decode(bytes, ctx) {
                prop_assert_eq!(&encode(&message, ctx).freeze(), bytes);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn encode_then_decode_is_identity((ctx, message) in context_and_message()) {
                let bytes = encode(&message, ctx).freeze();
                let decoded = decode(&bytes, ctx);
                prop_assert_eq!(decoded.as_ref(), Ok(&message));
                prop_assert_eq!(encode(&message, ctx).freeze(), bytes);
            }

            #[test]
            fn every_strict_prefix_fails((ctx, message) in context_and_message()) {
                let bytes = encode(&message, ctx).freeze();
                for len in 0..bytes.len() {
                    prop_assert!(decode(&bytes.slice(..len), ctx).is_err());
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                ctx in contexts(),
                tag in prop_oneof![
                    Just(b'B'), Just(b'C'), Just(b'O'), Just(b'R'), Just(b'Y'), Just(b'I'),
                    Just(b'U'), Just(b'D'), Just(b'T'), Just(b'M'), Just(b'S'), Just(b'E'),
                    Just(b'c'), Just(b'A'), any::<u8>()
                ],
                rest in vec(any::<u8>(), 0..128),
            ) {
                // A known tag first, most of the time, so the bodies get exercised.
                let mut raw = vec![tag];
                raw.extend_from_slice(&rest);
                decodes_canonically_or_fails(&Bytes::from(raw), ctx)?;
                decodes_canonically_or_fails(&Bytes::from(rest), ctx)?;
            }

            #[test]
            fn mutated_messages_never_panic(
                (ctx, message) in context_and_message(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            ) {
                // Valid messages with a few bytes overwritten, inserted or removed reach far
                // deeper into the decoder than random bytes do.
                let mut raw = encode(&message, ctx).to_vec();
                for (at, byte, how) in edits {
                    match how {
                        0 if !raw.is_empty() => {
                            let i = at.index(raw.len());
                            raw[i] = byte;
                        }
                        1 => {
                            let i = at.index(raw.len() + 1);
                            raw.insert(i, byte);
                        }
                        _ if !raw.is_empty() => {
                            let i = at.index(raw.len());
                            raw.remove(i);
                        }
                        _ => {}
                    }
                }
                for ctx in [V1, V2, V2_STREAM] {
                    decodes_canonically_or_fails(&Bytes::from(raw.clone()), ctx)?;
                }
            }
        }
    }
}
