//! The random change generator of the isolation property test's capture cases: inserts,
//! updates, deletes and TRUNCATEs of a generated schema (see [`crate::schema_gen`]), planned
//! against the oracle's state so that the expected tenant of every row stays known.

use std::collections::BTreeSet;

use crate::schema_gen::*;

// ---------------------------------------------------------------------------------------------
// Random changes (capture cases)

/// Rows that some other row references (primary, extra or self foreign key).
pub fn referenced_rows(spec: &Spec, state: &State) -> BTreeSet<(usize, i64)> {
    let mut refs: BTreeSet<(usize, Vec<String>)> = BTreeSet::new();
    for (i, rows) in state.iter().enumerate() {
        let mut links: Vec<(usize, Vec<String>)> = Vec::new();
        match &spec.tables[i].route {
            Route::Via { parent, .. } => links.push((*parent, spec.route_columns(i))),
            Route::Direct {
                references_root: true,
                ..
            } => links.push((0, vec![spec.tc.clone()])),
            _ => {}
        }
        if let Some(q) = spec.tables[i].extra {
            links.push((q, spec.extra_columns(i)));
        }
        if spec.tables[i].self_ref {
            links.push((i, spec.self_columns(i)));
        }
        for row in rows {
            for (target, cols) in &links {
                let key: Option<Vec<String>> = cols
                    .iter()
                    .map(|c| row.get(c).map(str::to_string))
                    .collect();
                if let Some(key) = key {
                    // A row does not keep itself referenced.
                    if *target == i && key_of(spec, i, row).as_ref() == Some(&key) {
                        continue;
                    }
                    refs.insert((*target, key));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for (i, rows) in state.iter().enumerate() {
        for row in rows {
            if let Some(k) = key_of(spec, i, row)
                && refs.contains(&(i, k))
            {
                out.insert((i, row.rid));
            }
        }
    }
    out
}

pub fn set_clause(assignments: &[(String, Option<String>)]) -> String {
    assignments
        .iter()
        .map(|(c, v)| {
            format!(
                "{} = {}",
                qi(c),
                v.as_deref().map_or("NULL".to_string(), ql)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One random change (SQL, description), or `None` when the drawn kind has nothing to act on.
pub fn plan_change(
    spec: &Spec,
    state: &State,
    rng: &mut fastrand::Rng,
    ctr: &mut Counters,
) -> Option<(String, String)> {
    let nt = spec.tenants.len();
    let tenant = rng.usize(..nt);
    let i = rng.usize(..spec.tables.len());
    let table = spec.qname(i);
    let name = &spec.tables[i].name;
    let t = &spec.tables[i];
    let is_root = matches!(t.route, Route::Root);
    let mine: Vec<&Row> = state[i]
        .iter()
        .filter(|r| r.tenant == Some(tenant))
        .collect();
    let referenced = referenced_rows(spec, state);
    let leaves: Vec<&Row> = mine
        .iter()
        .copied()
        .filter(|r| !referenced.contains(&(i, r.rid)))
        .collect();
    // Unreferenced rows lose their extra and self references when they change tenant.
    let clear_refs = |a: &mut Vec<(String, Option<String>)>| {
        for c in spec.nullable_refs(i) {
            if !a.iter().any(|(x, _)| *x == c) {
                a.push((c, None));
            }
        }
    };
    match rng.u32(..107) {
        // Many rows of one tenant in one transaction: 1000, larger than
        // logical_decoding_work_mem (streamed before it commits, and now and then rolled back).
        104..=106 => {
            if is_root {
                return None;
            }
            let row = new_row(spec, state, i, Some(tenant), rng, ctr, false)?;
            let rows = 1000;
            let base = ctr.rid;
            ctr.rid += rows;
            ctr.id += rows;
            let cols: Vec<&String> = row.vals.keys().collect();
            let exprs: Vec<String> = cols
                .iter()
                .map(|c| match (c.as_str(), t.key) {
                    ("id", Key::Id | Key::TenantComposite | Key::IdUnique) => format!("{base} + g"),
                    ("k1", _) => "g % 3".into(),
                    ("k2", _) => format!("'b{base}_' || g"),
                    ("payload", _) => "repeat(md5(g::text), 4)".into(),
                    _ => row.get(c).map_or("NULL".into(), ql),
                })
                .collect();
            Some((
                format!(
                    "INSERT INTO {table} (rid{}) SELECT {base} + g, {} FROM generate_series(1, {rows}) g;",
                    cols.iter()
                        .map(|c| format!(", {}", qi(c)))
                        .collect::<String>(),
                    exprs.join(", ")
                ),
                format!("bulk insert of {rows} rows into {name} for {tenant}"),
            ))
        }
        // Global tables change for every tenant; the excluded table for none.
        100..=103 => {
            ctr.rid += 1;
            let v = ql(&spec.tenants[tenant]);
            let rid = ctr.rid;
            match rng.u32(..4) {
                0 => Some((
                    format!(
                        "INSERT INTO {} VALUES ('C{rid}', 'new');",
                        spec.qual("currencies")
                    ),
                    "insert a currency".into(),
                )),
                1 => Some((
                    format!(
                        "UPDATE {} SET name = name || '+' WHERE code = 'EUR';",
                        spec.qual("currencies")
                    ),
                    "update a currency".into(),
                )),
                2 if spec.forced_global => Some((
                    format!(
                        "INSERT INTO {s} VALUES ({rid}, {v}, 'late'); UPDATE {s} SET k = k || '+' WHERE rid = (SELECT min(rid) FROM {s});",
                        s = spec.qual("shared")
                    ),
                    "insert and update forced-global rows".into(),
                )),
                3 if spec.excluded => Some((
                    format!(
                        "INSERT INTO {} VALUES ({rid}, {v}, 'late');",
                        spec.qual("scratch")
                    ),
                    "insert into the excluded table".into(),
                )),
                _ => None,
            }
        }
        // Insert a row of the tenant (or, rarely, of none).
        0..=29 => {
            if is_root {
                return None;
            }
            let who = if rng.u32(..10) == 0 {
                None
            } else {
                Some(tenant)
            };
            let row = new_row(spec, state, i, who, rng, ctr, true)?;
            Some((
                insert_sql(&table, &[&row]),
                format!("insert rid {} into {name} for {who:?}", row.rid),
            ))
        }
        // Update a payload: small, or TOASTed (later updates leave it unchanged).
        30..=44 => {
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let value = if rng.u32(..4) == 0 {
                format!("repeat(md5('{}'), 300)", rng.u32(..))
            } else {
                ql(&payload(rng))
            };
            Some((
                format!(
                    "UPDATE {table} SET payload = {value} WHERE rid = {};",
                    row.rid
                ),
                format!("update payload of {name} rid {}", row.rid),
            ))
        }
        // Delete a row of the tenant (cascades, SET NULL, or refused by NO ACTION).
        45..=59 => {
            if is_root {
                return None;
            }
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            Some((
                format!("DELETE FROM {table} WHERE rid = {};", row.rid),
                format!("delete {name} rid {}", row.rid),
            ))
        }
        // Move a row to another parent of the same tenant (its subtree follows).
        60..=71 => {
            let Route::Via { parent, .. } = &t.route else {
                return None;
            };
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let fk = spec.route_columns(i);
            let current: Vec<Option<String>> =
                fk.iter().map(|c| row.get(c).map(str::to_string)).collect();
            let others: Vec<Vec<String>> = state[*parent]
                .iter()
                .filter(|p| p.tenant == Some(tenant))
                .filter_map(|p| key_of(spec, *parent, p))
                .filter(|k| k.iter().cloned().map(Some).collect::<Vec<_>>() != current)
                .collect();
            if others.is_empty() {
                return None;
            }
            let to = pick(rng, &others);
            let a: Vec<(String, Option<String>)> = fk
                .iter()
                .cloned()
                .zip(to.iter().cloned().map(Some))
                .collect();
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("move {name} rid {} to parent {to:?} (same tenant)", row.rid),
            ))
        }
        // Move a row to another tenant, or to none, or from none to a tenant. A row others
        // reference takes its subtree along (the trigger of parent moves sends it).
        72..=86 => {
            if is_root {
                return None;
            }
            let other = (tenant + 1 + rng.usize(..nt - 1)) % nt;
            let movable = if rng.bool() { &leaves } else { &mine };
            // To another tenant, to no tenant, or from no tenant into one.
            let (row, to): (&Row, Option<usize>) = match rng.u32(..3) {
                0 => (
                    *movable.get(rng.usize(..movable.len().max(1)))?,
                    Some(other),
                ),
                1 => (*movable.get(rng.usize(..movable.len().max(1)))?, None),
                _ => {
                    let none: Vec<&Row> = state[i]
                        .iter()
                        .filter(|r| r.tenant.is_none() && !referenced.contains(&(i, r.rid)))
                        .collect();
                    (*none.get(rng.usize(..none.len().max(1)))?, Some(other))
                }
            };
            let mut a: Vec<(String, Option<String>)> = Vec::new();
            match &t.route {
                Route::Direct { nullable, .. } => {
                    if to.is_none() && !nullable {
                        return None;
                    }
                    a.push((spec.tc.clone(), to.map(|k| spec.tenants[k].clone())));
                    if t.key == Key::TenantComposite {
                        ctr.id += 1;
                        a.push(("id".into(), Some((100_000 + ctr.id).to_string())));
                    }
                }
                Route::Via {
                    parent,
                    nullable,
                    carrier,
                    ..
                } => {
                    let fk = spec.route_columns(i);
                    match to {
                        None => {
                            if !nullable || carrier.is_some() {
                                return None;
                            }
                            a.extend(fk.iter().map(|c| (c.clone(), None)));
                        }
                        Some(k) => {
                            let parents: Vec<Vec<String>> = state[*parent]
                                .iter()
                                .filter(|p| p.tenant == Some(k))
                                .filter_map(|p| key_of(spec, *parent, p))
                                .collect();
                            if parents.is_empty() {
                                return None;
                            }
                            let p = pick(rng, &parents);
                            a.extend(fk.iter().cloned().zip(p.into_iter().map(Some)));
                            if t.key == Key::TenantComposite {
                                ctr.id += 1;
                                a.push(("id".into(), Some((100_000 + ctr.id).to_string())));
                            }
                        }
                    }
                }
                Route::Root => return None,
            }
            clear_refs(&mut a);
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!(
                    "move {name} rid {} from {:?} to {}",
                    row.rid,
                    row.tenant.map(|k| &spec.tenants[k]),
                    to.map_or("no tenant".to_string(), |k| format!(
                        "{:?}",
                        spec.tenants[k]
                    ))
                ),
            ))
        }
        // Change a key (children follow with ON UPDATE CASCADE, or the change is refused).
        87..=94 => {
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            ctr.id += 1;
            let a = match t.key {
                Key::Id | Key::TenantComposite => {
                    vec![("id".to_string(), Some((200_000 + ctr.id).to_string()))]
                }
                Key::Composite | Key::UniqueComposite | Key::IdUnique => {
                    vec![("k2".to_string(), Some(format!("r{}", ctr.id)))]
                }
                _ => return None,
            };
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("change the key of {name} rid {}", row.rid),
            ))
        }
        // Point the extra reference elsewhere (a TOASTed payload stays unchanged).
        95..=97 => {
            let q = t.extra?;
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let targets: Vec<Vec<String>> = state[q]
                .iter()
                .filter(|r| r.tenant == Some(tenant))
                .filter_map(|r| key_of(spec, q, r))
                .collect();
            let xc = spec.extra_columns(i);
            let a: Vec<(String, Option<String>)> = if targets.is_empty() || rng.bool() {
                spec.nullable_refs(i)
                    .into_iter()
                    .filter(|c| xc.contains(c))
                    .map(|c| (c, None))
                    .collect()
            } else {
                xc.iter()
                    .cloned()
                    .zip(pick(rng, &targets).into_iter().map(Some))
                    .collect()
            };
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("repoint the extra reference of {name} rid {}", row.rid),
            ))
        }
        // TRUNCATE a table nothing references: every tenant loses its rows.
        _ => {
            if spec.referenced().contains(&i) {
                return None;
            }
            Some((format!("TRUNCATE {table};"), format!("truncate {name}")))
        }
    }
}
