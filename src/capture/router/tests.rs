use super::*;
use crate::pg::pgoutput::{Column, Delete, Insert, ReplicaIdentity, Update};
use crate::source::catalog::{self, Table};

fn table(name: &str, columns: &[&str], scope: TableScope) -> Table {
    Table {
        schema: "app".into(),
        name: name.into(),
        columns: columns
            .iter()
            .map(|c| catalog::Column {
                name: c.to_string(),
                type_name: "text".into(),
                not_null: true,
                text_only: false,
            })
            .collect(),
        replica_identity: catalog::ReplicaIdentity::Default(vec!["id".into()]),
        row_security: false,
        can_select: true,
        unlogged: false,
        partitions: None,
        scope,
        oid: 0,
        attnums: Default::default(),
    }
}

/// funds (own tenant column) ← investments (fund_id) ← lots (investment_id).
fn router() -> Router {
    let catalog = Catalog {
        tenant_column: "org".into(),
        tables: vec![
            table(
                "funds",
                &["id", "org"],
                TableScope::Tenant(Route::Direct {
                    column: "org".into(),
                }),
            ),
            table(
                "investments",
                &["id", "fund_id"],
                TableScope::Tenant(Route::Via {
                    columns: vec!["fund_id".into()],
                    parent: 0,
                    parent_columns: vec!["id".into()],
                    nullable: false,
                }),
            ),
            table(
                "lots",
                &["id", "investment_id"],
                TableScope::Tenant(Route::Via {
                    columns: vec!["investment_id".into()],
                    parent: 1,
                    parent_columns: vec!["id".into()],
                    nullable: false,
                }),
            ),
            table("currencies", &["code"], TableScope::Global),
        ],
    };
    let mut r = Router::new(catalog, &["app".into()], "42");
    for (oid, name, cols) in [
        (1, "funds", &["id", "org"][..]),
        (2, "investments", &["id", "fund_id"][..]),
        (3, "lots", &["id", "investment_id"][..]),
        (4, "currencies", &["code"][..]),
    ] {
        r.relation(&Relation {
            xid: None,
            oid,
            namespace: "app".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|c| Column {
                    part_of_key: *c == "id" || *c == "code",
                    name: c.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
        .unwrap();
    }
    r
}

fn tuple(values: &[&str]) -> Tuple {
    Tuple(
        values
            .iter()
            .map(|v| Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes())))
            .collect(),
    )
}

fn insert(relation: u32, values: &[&str]) -> Message {
    Message::Insert(Insert {
        xid: None,
        relation,
        new: tuple(values),
    })
}

fn delete_key(relation: u32, id: &str, width: usize) -> Message {
    let mut values = vec![Value::Null; width];
    values[0] = Value::Text(bytes::Bytes::copy_from_slice(id.as_bytes()));
    Message::Delete(Delete {
        xid: None,
        relation,
        old: OldTuple::Key(Tuple(values)),
    })
}

fn tenant(r: Routed) -> String {
    match r {
        Routed::One(Destination::Tenant(t)) => t.to_string(),
        other => panic!("expected a tenant, got {other:?}"),
    }
}

#[test]
fn routes_through_foreign_key_chains_and_forgets_deleted_keys_at_commit() {
    let mut r = router();
    assert_eq!(tenant(r.route(&insert(1, &["f1", "t1"])).unwrap()), "t1");
    assert_eq!(tenant(r.route(&insert(2, &["i1", "f1"])).unwrap()), "t1");
    assert_eq!(tenant(r.route(&insert(3, &["l1", "i1"])).unwrap()), "t1");
    r.commit();
    // A parent's DELETE with only its key routes by the key map; a cascaded child later in
    // the same transaction still finds it; after the commit it is gone.
    assert_eq!(tenant(r.route(&delete_key(2, "i1", 2)).unwrap()), "t1");
    assert_eq!(tenant(r.route(&insert(3, &["l2", "i1"])).unwrap()), "t1");
    r.commit();
    assert!(matches!(
        r.route(&insert(3, &["l3", "i1"])),
        Err(RouteError::UnknownParent { .. })
    ));
    // A DELETE of a child that carries neither its route nor a known key stops capture.
    assert!(matches!(
        r.route(&delete_key(3, "l1", 2)),
        Err(RouteError::MissingColumn { .. })
    ));
    assert!(matches!(
        r.route(&insert(4, &["EUR"])).unwrap(),
        Routed::One(Destination::Global)
    ));
}

#[test]
fn an_update_that_changes_the_tenant_moves_the_row() {
    let mut r = router();
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    let update = update(1, Some(OldTuple::Full(tuple(&["f1", "t1"]))), &["f1", "t2"]);
    assert_eq!(
        moved(r.route(&update).unwrap()),
        (Some("t1".into()), Some("t2".into()))
    );
    // Its children follow the key map.
    assert_eq!(tenant(r.route(&insert(2, &["i9", "f1"])).unwrap()), "t2");
}

fn update(relation: u32, old: Option<OldTuple>, new: &[&str]) -> Message {
    Message::Update(Update {
        xid: None,
        relation,
        old,
        new: tuple(new),
    })
}

fn null_tuple(values: &[Option<&str>]) -> Tuple {
    Tuple(
        values
            .iter()
            .map(|v| match v {
                Some(v) => Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes())),
                None => Value::Null,
            })
            .collect(),
    )
}

fn moved(r: Routed) -> (Option<String>, Option<String>) {
    match r {
        Routed::Moved { from, to } => (from.map(|t| t.to_string()), to.map(|t| t.to_string())),
        other => panic!("expected a move, got {other:?}"),
    }
}

#[test]
fn an_update_without_its_old_row_finds_the_old_tenant_in_the_key_map() {
    let mut r = router();
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    r.route(&insert(1, &["f2", "t1"])).unwrap();
    r.route(&insert(2, &["i1", "f2"])).unwrap();
    r.commit();
    // Default replica identity: the tenant column changed, the key did not, no old row.
    assert_eq!(
        moved(r.route(&update(1, None, &["f1", "t2"])).unwrap()),
        (Some("t1".into()), Some("t2".into()))
    );
    // An UPDATE that leaves the tenant alone stays an UPDATE of that tenant.
    assert_eq!(
        tenant(r.route(&update(1, None, &["f1", "t2"])).unwrap()),
        "t2"
    );
    // A key change carries the old key: the old tenant comes from the map by it.
    let old = OldTuple::Key(null_tuple(&[Some("i1"), None]));
    assert_eq!(
        tenant(r.route(&update(2, Some(old), &["i2", "f2"])).unwrap()),
        "t1"
    );
    r.commit();
    assert!(r.route(&insert(3, &["l1", "i1"])).is_err(), "i1 became i2");
    assert_eq!(tenant(r.route(&insert(3, &["l1", "i2"])).unwrap()), "t1");
    // lots: no key map, and its replica identity lacks the route. Whether the row moved
    // cannot be known, so even an UPDATE whose new row routes is refused, not guessed.
    assert!(matches!(
        r.route(&update(3, None, &["l1", "i2"])),
        Err(RouteError::MissingColumn { .. })
    ));
}

#[test]
fn rows_move_into_and_out_of_every_tenant() {
    let mut r = router();
    let full = |values: &[Option<&str>]| Some(OldTuple::Full(null_tuple(values)));
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    let out = Message::Update(Update {
        xid: None,
        relation: 1,
        old: full(&[Some("f1"), Some("t1")]),
        new: null_tuple(&[Some("f1"), None]),
    });
    assert_eq!(moved(r.route(&out).unwrap()), (Some("t1".into()), None));
    // Its children now belong to no tenant either: skipped, not an error.
    assert!(matches!(
        r.route(&insert(2, &["i1", "f1"])).unwrap(),
        Routed::One(Destination::Skip)
    ));
    assert!(matches!(
        r.route(&update(2, None, &["i1", "f1"])).unwrap(),
        Routed::One(Destination::Skip)
    ));
    r.commit();
    // Back in, without the old row: the key map knows the fund is of no tenant.
    assert_eq!(
        moved(r.route(&update(1, None, &["f1", "t2"])).unwrap()),
        (None, Some("t2".into()))
    );
    assert_eq!(tenant(r.route(&insert(2, &["i2", "f1"])).unwrap()), "t2");
}

#[test]
fn keys_of_no_tenant_survive_a_checkpoint() {
    let mut r = router();
    let row = Message::Insert(Insert {
        xid: None,
        relation: 1,
        new: null_tuple(&[Some("f1"), None]),
    });
    assert!(matches!(
        r.route(&row).unwrap(),
        Routed::One(Destination::Skip)
    ));
    r.commit();
    let bytes = crate::repository::routes::encode(&r.checkpoint());
    let mut fresh = router();
    fresh.apply(crate::repository::routes::decode("k", &bytes).unwrap());
    assert!(matches!(
        fresh.route(&insert(2, &["i1", "f1"])).unwrap(),
        Routed::One(Destination::Skip)
    ));
    assert!(
        fresh.route(&insert(2, &["i2", "f2"])).is_err(),
        "f2 is unknown"
    );
}

#[test]
fn persisted_deltas_rebuild_the_same_maps() {
    let mut r = router();
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    r.route(&insert(2, &["i1", "f1"])).unwrap();
    r.commit();
    let checkpoint = r.checkpoint();
    r.take_delta();
    r.route(&delete_key(2, "i1", 2)).unwrap();
    r.route(&insert(1, &["f2", "t2"])).unwrap();
    r.commit();
    let delta = r.take_delta();
    let bytes = crate::repository::routes::encode(&delta);
    let mut fresh = router();
    fresh.apply(checkpoint);
    fresh.apply(crate::repository::routes::decode("k", &bytes).unwrap());
    assert_eq!(fresh.checkpoint().len(), r.checkpoint().len());
    assert_eq!(
        tenant(fresh.route(&insert(2, &["i2", "f2"])).unwrap()),
        "t2"
    );
    assert!(
        fresh.route(&insert(3, &["l1", "i1"])).is_err(),
        "i1 was deleted"
    );
}

#[test]
fn rows_below_a_moved_parent_follow_it_and_their_own_children_follow_them() {
    let mut r = router();
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    r.route(&insert(2, &["i1", "f1"])).unwrap();
    r.route(&insert(3, &["l1", "i1"])).unwrap();
    r.commit();
    let moving = update(1, Some(OldTuple::Full(tuple(&["f1", "t1"]))), &["f1", "t2"]);
    r.route(&moving).unwrap();
    // Without the trigger's word, the move is unaccompanied; its first message says it spoke.
    assert_eq!(r.unaccompanied.len(), 1);
    r.moves_described(0);
    assert!(r.take_unaccompanied().is_empty());
    // The rows below, from the top: each leaves t1 for t2, and keeps its own key current.
    let expected = (Some("t1".to_string()), Some("t2".to_string()));
    assert_eq!(
        moved(r.route_moved(2, &tuple(&["i1", "f1"])).unwrap()),
        expected
    );
    assert_eq!(
        moved(r.route_moved(3, &tuple(&["l1", "i1"])).unwrap()),
        expected
    );
    r.commit();
    // A child inserted later under the moved investment is t2's.
    assert_eq!(tenant(r.route(&insert(3, &["l2", "i1"])).unwrap()), "t2");
    // A route changed without a tenant change (a parent moved within its tenant) moves nothing.
    r.route(&insert(1, &["f2", "t2"])).unwrap();
    let within = update(2, None, &["i1", "f2"]);
    assert_eq!(tenant(r.route(&within).unwrap()), "t2");
    assert!(matches!(
        r.route_moved(3, &tuple(&["l1", "i1"])).unwrap(),
        Routed::One(Destination::Skip)
    ));
}

#[test]
fn a_move_nobody_describes_names_its_table_and_both_tenants() {
    let mut r = router();
    r.route(&insert(1, &["f1", "t1"])).unwrap();
    r.route(&insert(1, &["f2", "t2"])).unwrap();
    r.route(&insert(2, &["i1", "f1"])).unwrap();
    r.route(&insert(2, &["i2", "f2"])).unwrap();
    r.route(&insert(3, &["l1", "i1"])).unwrap();
    r.commit();
    let moving = update(1, Some(OldTuple::Full(tuple(&["f1", "t1"]))), &["f1", "t2"]);
    r.route(&moving).unwrap();
    assert_eq!(
        r.take_unaccompanied(),
        vec![(
            "app.funds".to_string(),
            vec![Arc::from("t1"), Arc::from("t2")]
        )]
    );
    r.commit();
    // No table routes through lots: a lot moved to another tenant takes nothing along.
    let lot = update(3, Some(OldTuple::Full(tuple(&["l1", "i1"]))), &["l1", "i2"]);
    assert!(matches!(r.route(&lot).unwrap(), Routed::Moved { .. }));
    assert!(r.take_unaccompanied().is_empty());
}

#[test]
fn a_new_shape_is_news_only_when_the_stream_does_not_describe_it() {
    let mut r = router();
    let relation = |columns: &[(&str, bool)]| Relation {
        xid: None,
        oid: 1,
        namespace: "app".into(),
        name: "funds".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .map(|(c, key)| Column {
                part_of_key: *key,
                name: c.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    };
    // A replica identity changed is no new shape; a column added is.
    assert!(
        !r.relation(&relation(&[("id", true), ("org", true)]))
            .unwrap()
    );
    assert!(
        r.relation(&relation(&[("id", true), ("org", true), ("note", false)]))
            .unwrap()
    );
    // With the schema-change triggers the stream says when it changed.
    r.set_schema_changes_captured(true);
    assert!(
        !r.relation(&relation(&[("id", true), ("org", true)]))
            .unwrap()
    );
}
