-- updog-backup: schema changes into the change stream. Installed by `updog-backup init` when its
-- role may create event triggers, otherwise run by a superuser (event triggers need one).
--
-- Each DDL command on a table, each dropped object and each table rewrite emits a
-- transactional logical message (prefix 'updog-backup/ddl') inside the migrating transaction,
-- so the change stream carries it at its place between the row changes it separates. The
-- message describes the tables as the command left them (columns with their numbers,
-- defaults, the value existing rows got, constraints), which is what a restore needs to
-- follow the change exactly. Nothing is written to any table.
SET client_min_messages = warning;
CREATE SCHEMA IF NOT EXISTS updog_backup_ddl;
REVOKE ALL ON SCHEMA updog_backup_ddl FROM PUBLIC;

CREATE OR REPLACE FUNCTION updog_backup_ddl.table_definition(relation oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT jsonb_build_object(
    'oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname, 'kind', c.relkind,
    'partition_key', CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END,
    'partition_of', (SELECT format('%I.%I', pn.nspname, p.relname)
                       FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
                       JOIN pg_namespace pn ON pn.oid = p.relnamespace
                      WHERE i.inhrelid = c.oid AND c.relispartition),
    'bound', CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END,
    'row_security', c.relrowsecurity, 'force_row_security', c.relforcerowsecurity,
    'columns', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
               'attnum', a.attnum, 'name', a.attname,
               'type', format_type(a.atttypid, a.atttypmod),
               'not_null', a.attnotnull,
               'default', pg_get_expr(d.adbin, d.adrelid),
               'missing', CASE WHEN a.atthasmissing THEN a.attmissingval::text END,
               'generated', nullif(a.attgenerated, ''),
               'identity', nullif(a.attidentity, ''))
             ORDER BY a.attnum)
        FROM pg_attribute a
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
       WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'),
    'constraints', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
               'name', k.conname, 'type', k.contype, 'definition', pg_get_constraintdef(k.oid))
             ORDER BY k.conname)
        FROM pg_constraint k WHERE k.conrelid = c.oid), '[]'),
    'policies', coalesce((
      SELECT jsonb_agg(jsonb_build_object(
               'name', p.polname,
               'definition', format('AS %s FOR %s TO %s%s%s',
                 CASE WHEN p.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                 CASE p.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                               WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                 (SELECT string_agg(CASE WHEN r = 0 THEN 'PUBLIC'
                                         ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                    FROM unnest(p.polroles) r),
                 ' USING (' || pg_get_expr(p.polqual, p.polrelid) || ')',
                 ' WITH CHECK (' || pg_get_expr(p.polwithcheck, p.polrelid) || ')'))
             ORDER BY p.polname)
        FROM pg_policy p WHERE p.polrelid = c.oid), '[]'))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.oid = relation AND c.relkind IN ('r', 'p')
$$;

CREATE OR REPLACE FUNCTION updog_backup_ddl.capture() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  payload jsonb;
  tables jsonb;
BEGIN
  BEGIN
  IF tg_event = 'ddl_command_end' THEN
    SELECT jsonb_agg(jsonb_build_object(
             'tag', e.command_tag, 'type', e.object_type, 'identity', e.object_identity,
             'schema', coalesce(e.schema_name, tn.nspname),
             'table', updog_backup_ddl.table_definition(t.relation),
             'index', CASE WHEN c.relkind IN ('i', 'I') THEN pg_get_indexdef(e.objid) END,
             'sequence', CASE WHEN c.relkind = 'S' THEN (
                 SELECT jsonb_build_object(
                   'identity', EXISTS (SELECT 1 FROM pg_depend d
                                        WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
                                          AND d.deptype = 'i'),
                   'definition', format('AS %s INCREMENT BY %s MINVALUE %s MAXVALUE %s START WITH %s CACHE %s%s',
                     format_type(s.seqtypid, NULL), s.seqincrement, s.seqmin, s.seqmax, s.seqstart,
                     s.seqcache, CASE WHEN s.seqcycle THEN ' CYCLE' ELSE '' END))
                 FROM pg_sequence s WHERE s.seqrelid = e.objid) END)
             ORDER BY e.ordinality)
      INTO payload
      FROM pg_event_trigger_ddl_commands() WITH ORDINALITY e
      LEFT JOIN pg_class c ON e.classid = 'pg_class'::regclass AND c.oid = e.objid
      -- The table the command changed: itself, or the owner of its policy, constraint or
      -- trigger (which have no schema of their own).
      CROSS JOIN LATERAL (SELECT CASE e.classid
                 WHEN 'pg_class'::regclass THEN e.objid
                 WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = e.objid)
                 WHEN 'pg_constraint'::regclass THEN (SELECT conrelid FROM pg_constraint WHERE oid = e.objid)
                 WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = e.objid)
               END AS relation) t
      LEFT JOIN pg_class tc ON tc.oid = t.relation
      LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace
     WHERE NOT e.in_extension AND coalesce(e.schema_name, tn.nspname) IS NOT NULL;
    IF payload IS NOT NULL THEN
      payload := jsonb_build_object('version', 1, 'event', 'command', 'tag', tg_tag,
                                    'commands', payload);
    END IF;
  ELSIF tg_event = 'sql_drop' THEN
    SELECT jsonb_agg(jsonb_build_object(
             'type', object_type, 'identity', object_identity, 'schema', schema_name,
             'name', object_name, 'address', address_names, 'original', original)
             ORDER BY ordinality)
      INTO payload
      FROM pg_event_trigger_dropped_objects() WITH ORDINALITY
     WHERE schema_name IS NOT NULL AND NOT is_temporary;
    IF payload IS NULL THEN RETURN; END IF;
    -- The tables that lost a column, constraint, policy or default, as they are now.
    SELECT jsonb_agg(updog_backup_ddl.table_definition(c.oid))
      INTO tables
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE (n.nspname, c.relname) IN (
             SELECT address_names[1], address_names[2] FROM pg_event_trigger_dropped_objects()
              WHERE object_type IN ('table column', 'table constraint', 'policy', 'default value')
                AND cardinality(address_names) >= 2);
    payload := jsonb_build_object('version', 1, 'event', 'drop', 'tag', tg_tag,
                                  'dropped', payload, 'tables', coalesce(tables, '[]'));
  ELSIF tg_event = 'table_rewrite' THEN
    SELECT jsonb_build_object('version', 1, 'event', 'rewrite', 'tag', tg_tag,
             'schema', n.nspname, 'name', c.relname,
             'reason', pg_event_trigger_table_rewrite_reason(),
             -- Whether the statement may hold a USING clause: without one, a type change
             -- converts each value with the type's own cast, which a restore can repeat. The
             -- test is on the whole text the client sent, so it errs towards "maybe".
             'using', position('using' in lower(current_query())) > 0,
             -- Rows given new values (a default's, a type change's) are sent after the
             -- statement, when the table has a primary key to find them by and a publication
             -- carries it (itself or its partition root): nothing else is captured.
             'rows', pg_event_trigger_table_rewrite_reason() & 6 <> 0
                     AND EXISTS (SELECT 1 FROM pg_index i
                                  WHERE i.indrelid = c.oid AND i.indisprimary)
                     AND EXISTS (SELECT 1 FROM pg_publication_tables p
                                  WHERE format('%I.%I', p.schemaname, p.tablename)::regclass
                                        IN (c.oid, pg_partition_root(c.oid))))
      INTO payload
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = pg_event_trigger_table_rewrite_oid();
    IF (payload->>'rows')::boolean THEN
      PERFORM set_config('updog_backup.rewritten',
        concat_ws(',', nullif(current_setting('updog_backup.rewritten', true), ''),
                  pg_event_trigger_table_rewrite_oid()::text), true);
    END IF;
  END IF;
  EXCEPTION WHEN OTHERS THEN
    -- Never the application's migration fails because of us: a restore that meets this
    -- message refuses from here on instead.
    payload := jsonb_build_object('version', 1, 'event', 'failed', 'tag', tg_tag,
                                  'error', SQLERRM);
  END;
  IF payload IS NOT NULL THEN
    PERFORM pg_logical_emit_message(true, 'updog-backup/ddl', payload::text);
  END IF;
  IF tg_event = 'ddl_command_end'
     AND coalesce(current_setting('updog_backup.rewritten', true), '') <> '' THEN
    -- Not in an EXCEPTION block: logical decoding does not always keep the messages of a
    -- subtransaction in their place among the transaction's changes (PostgreSQL 15 puts one
    -- whose only change is a message after everything else), and these must precede the
    -- statements after this one.
    PERFORM updog_backup_ddl.emit_rows(r::oid, tg_tag)
       FROM unnest(string_to_array(current_setting('updog_backup.rewritten'), ',')) r;
    PERFORM set_config('updog_backup.rewritten', '', true);
  END IF;
END
$$;

-- Whether column `attnum` is part of what pgoutput marks as the replica identity: every column
-- with REPLICA IDENTITY FULL, else the primary key's or the identity index's.
CREATE OR REPLACE FUNCTION updog_backup_ddl.in_replica_identity(relation oid, identity "char",
                                                                attnum int2) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT identity = 'f'
      OR EXISTS (SELECT 1 FROM pg_index i
                  WHERE i.indrelid = relation AND attnum = ANY (i.indkey)
                    AND CASE identity WHEN 'd' THEN i.indisprimary ELSE i.indisreplident END)
$$;

-- Every row of a table a statement rewrote with new values, read by ranges of 128 heap pages
-- (1 MB), one message per range: the columns pgoutput would send (generated ones are not),
-- each value as its type's text output (as pgoutput sends them), and the replica identity's
-- columns marked.
CREATE OR REPLACE FUNCTION updog_backup_ddl.emit_rows(relation oid, tag text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog
  -- Values as exact as pgoutput's whatever the migrating session set.
  SET extra_float_digits = 3 SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'
  SET bytea_output = 'hex' AS $$
DECLARE
  header jsonb;
  list text;
  pages bigint;
  first bigint;
  chunk text;
BEGIN
  SELECT jsonb_build_object('version', 1, 'event', 'rows', 'tag', tag, 'oid', c.oid::int8,
           'schema', n.nspname, 'name', c.relname, 'replica_identity', c.relreplident,
           'columns', jsonb_agg(jsonb_build_object(
               'name', a.attname, 'type_oid', a.atttypid::int8, 'type_modifier', a.atttypmod,
               'key', updog_backup_ddl.in_replica_identity(c.oid, c.relreplident, a.attnum))
             ORDER BY a.attnum)),
         string_agg(format('%I::text', a.attname), ', ' ORDER BY a.attnum)
    INTO header, list
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attgenerated = ''
   WHERE c.oid = relation
   GROUP BY c.oid, n.nspname, c.relname, c.relreplident;
  pages := pg_relation_size(relation) / current_setting('block_size')::bigint;
  first := 0;
  WHILE first <= pages LOOP
    EXECUTE format('SELECT string_agg(to_jsonb(ARRAY[%s])::text, %L) FROM %s
                     WHERE ctid >= %L::tid AND ctid < %L::tid',
                   list, ',', relation::regclass,
                   format('(%s,0)', first), format('(%s,0)', first + 128))
      INTO chunk;
    IF chunk IS NOT NULL THEN
      -- The header's text ends with its last value's closing quote and the object's brace.
      PERFORM pg_logical_emit_message(true, 'updog-backup/ddl',
        left(header::text, -1) || ', "rows": [' || chunk || ']}');
    END IF;
    first := first + 128;
  END LOOP;
END
$$;

-- One message of the rows that moved with their parent (`moves.rs` generates the triggers that
-- call it, one per table others reach their tenant through): `relation`'s rows, each as its
-- record's text (its columns' text output, as pgoutput sends them), with the columns that text
-- holds (generated ones included, marked) and the replica identity's.
CREATE OR REPLACE FUNCTION updog_backup_ddl.moved_message(tag text, parent oid, relation oid,
                                                          rows jsonb) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
  SELECT jsonb_build_object('version', 1, 'event', 'moved', 'tag', tag, 'parent', parent::int8,
           'table', jsonb_build_object('oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname,
             'replica_identity', c.relreplident,
             'columns', (SELECT jsonb_agg(jsonb_build_object(
                 'name', a.attname, 'type_oid', a.atttypid::int8, 'type_modifier', a.atttypmod,
                 'generated', a.attgenerated <> '',
                 'key', updog_backup_ddl.in_replica_identity(c.oid, c.relreplident, a.attnum))
               ORDER BY a.attnum)
               FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
             'rows', rows))::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE c.oid = relation
$$;

DROP EVENT TRIGGER IF EXISTS updog_backup_ddl_command;
DROP EVENT TRIGGER IF EXISTS updog_backup_ddl_drop;
DROP EVENT TRIGGER IF EXISTS updog_backup_ddl_rewrite;
CREATE EVENT TRIGGER updog_backup_ddl_command ON ddl_command_end
  EXECUTE FUNCTION updog_backup_ddl.capture();
CREATE EVENT TRIGGER updog_backup_ddl_drop ON sql_drop
  EXECUTE FUNCTION updog_backup_ddl.capture();
CREATE EVENT TRIGGER updog_backup_ddl_rewrite ON table_rewrite
  EXECUTE FUNCTION updog_backup_ddl.capture();
