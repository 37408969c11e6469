//! A plan plus Bind parameters → the shards to run on.

use super::{Hint, KeyExpr, Params, Plan, Route, RouteError, ShardList, Target};
use crate::pghash::KeyValue;
use crate::shardmap::{Located, MapError, ShardMap, TableRule};

/// The shards `plan` runs on with these parameters.
pub fn route(plan: &Plan, map: &ShardMap, params: &Params) -> Result<Target, RouteError> {
    if let Some(h) = &plan.hint {
        return hinted(h, plan, map);
    }
    let target = match &plan.route {
        Route::Refuse { sqlstate, message } => {
            return Err(RouteError {
                sqlstate,
                message: message.clone(),
            })
        }
        Route::Keys { dist, keys, within } => {
            let mut shards = ShardList::new();
            for k in keys {
                locate_expr(map, *dist, k, within.as_ref(), params, &mut shards)?;
            }
            shards.sort_unstable();
            shards.dedup();
            match shards.as_slice() {
                [one] => Target::One(*one),
                // `= ANY('{}')` matches no row: any one shard answers that correctly.
                [] => Target::One(0),
                _ => Target::Some(shards.into_vec()),
            }
        }
        Route::AllShards | Route::Reference { write: true } => Target::All,
        Route::Reference { write: false } | Route::Any => Target::One(0),
        Route::DefaultShard => Target::One(map.default_shard),
    };
    let single = matches!(target, Target::One(_)) || map.shards == 1;
    match &plan.scatter_refusal {
        Some(e) if !single => Err(e.clone()),
        _ if map.shards == 1 => Ok(Target::One(0)),
        _ => Ok(target),
    }
}

fn hinted(h: &Hint, plan: &Plan, map: &ShardMap) -> Result<Target, RouteError> {
    match h {
        Hint::Shard(n) if *n < map.shards => Ok(Target::One(*n)),
        Hint::Shard(n) => Err(RouteError {
            sqlstate: "22023",
            message: format!(
                "hint shard={n} names no shard: there are {} shards (0..{})",
                map.shards, map.shards
            ),
        }),
        Hint::Key(k) => {
            let mut dists = plan
                .tables
                .iter()
                .filter_map(|t| match super::walk::lookup(map, t) {
                    Some(TableRule::Sharded { dist, .. }) => Some(*dist),
                    _ => None,
                });
            let from_tables = dists.next().filter(|d| dists.all(|x| x == *d));
            let dist = match (&plan.route, from_tables, map.distributions.len()) {
                (Route::Keys { dist, .. }, _, _) => *dist,
                (_, Some(d), _) => d,
                (_, None, 1) => 0,
                _ => {
                    return Err(RouteError::unsupported(format!(
                        "hint key={k} is ambiguous: the statement names no sharded table and there are {} distributions; use shard=N",
                        map.distributions.len()
                    )))
                }
            };
            let mut shards = ShardList::new();
            locate_expr(
                map,
                dist,
                &KeyExpr::Literal(k.clone()),
                None,
                &Params::NONE,
                &mut shards,
            )?;
            match shards.as_slice() {
                [one] => Ok(Target::One(*one)),
                _ => Ok(Target::Some(shards.into_vec())),
            }
        }
    }
}

/// A map error as the client sees it.
pub(super) fn map_error(e: MapError) -> RouteError {
    let sqlstate = match e {
        MapError::NullKey { .. } => "22004",
        MapError::NoRange { .. } => "23514",
        MapError::Key(_) => "22P02",
        MapError::Invalid(_) => "XX000",
    };
    RouteError {
        sqlstate,
        message: e.to_string(),
    }
}

/// A parameter's bytes and whether it is in binary format.
fn param<'a>(params: &Params<'a>, n: usize) -> Result<(Option<&'a [u8]>, bool), RouteError> {
    let Some(v) = params.values.get(n - 1) else {
        return Err(RouteError {
            sqlstate: "08P01",
            message: format!(
                "sharding key parameter ${n} was not bound ({} parameters)",
                params.values.len()
            ),
        });
    };
    let binary = match params.formats {
        [] => false,
        [f] => *f == 1,
        fs => fs.get(n - 1).is_some_and(|f| *f == 1),
    };
    Ok((*v, binary))
}

/// Adds the shards of one key expression.
pub(super) fn locate_expr(
    map: &ShardMap,
    dist: usize,
    key: &KeyExpr,
    within: Option<&KeyExpr>,
    params: &Params,
    out: &mut ShardList,
) -> Result<(), RouteError> {
    let within_buf;
    let within_key = match within {
        None => None,
        Some(w) => {
            within_buf = match w {
                KeyExpr::Literal(s) => Some((s.as_bytes().to_vec(), false)),
                KeyExpr::Param(n) => {
                    let (v, binary) = param(params, *n)?;
                    v.map(|b| (b.to_vec(), binary))
                }
                _ => None,
            };
            within_buf
                .as_ref()
                .map(|(b, bin)| crate::pghash::parse_loose(b, *bin))
        }
    };
    each_key(map, dist, key, params, |k| {
        match map
            .locate(dist, &k, within_key.as_ref())
            .map_err(map_error)?
        {
            Located::One(s) => out.push(s),
            Located::Group(g) => out.extend(g),
        }
        Ok(())
    })
}

/// Calls `f` with each key value one key expression stands for (an array parameter: each
/// element); a NULL key is an error.
pub(super) fn each_key(
    map: &ShardMap,
    dist: usize,
    key: &KeyExpr,
    params: &Params,
    mut f: impl FnMut(KeyValue) -> Result<(), RouteError>,
) -> Result<(), RouteError> {
    let null = || {
        map_error(MapError::NullKey {
            dist: map.distributions[dist].name.clone(),
        })
    };
    match key {
        KeyExpr::Null => Err(null()),
        KeyExpr::Literal(s) => f(map.parse_key(dist, s.as_bytes()).map_err(map_error)?),
        KeyExpr::Param(n) => match param(params, *n)? {
            (None, _) => Err(null()),
            (Some(b), false) => f(map.parse_key(dist, b).map_err(map_error)?),
            (Some(b), true) => f(map.parse_key_binary(dist, b).map_err(map_error)?),
        },
        KeyExpr::ParamArray(n) => {
            let (Some(b), binary) = param(params, *n)? else {
                return Err(null());
            };
            let elems = if binary {
                parse_binary_array(b)
            } else {
                parse_text_array(b)
            }
            .map_err(|m| RouteError {
                sqlstate: "22P02",
                message: format!("sharding key array parameter ${n}: {m}"),
            })?;
            for e in elems {
                let e = e.ok_or_else(null)?;
                let k = if binary {
                    map.parse_key_binary(dist, &e)
                } else {
                    map.parse_key(dist, &e)
                };
                f(k.map_err(map_error)?)?;
            }
            Ok(())
        }
    }
}

/// True when every key of a keyed route under `dist` equals `want` (and there is at least one).
pub fn keys_all_equal(
    map: &ShardMap,
    route: &Route,
    dist: usize,
    params: &Params,
    want: &KeyValue,
) -> Result<bool, RouteError> {
    let Route::Keys { dist: d, keys, .. } = route else {
        return Ok(false);
    };
    if *d != dist || keys.is_empty() {
        return Ok(false);
    }
    let mut all = true;
    for k in keys {
        each_key(map, dist, k, params, |v| {
            all &= v == *want;
            Ok(())
        })?;
    }
    Ok(all)
}

/// Elements of a one-dimensional PostgreSQL array in text form (`{1,2,"a b",NULL}`).
pub(super) fn parse_text_array(t: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let s = t.trim_ascii();
    let inner = s
        .strip_prefix(b"{")
        .and_then(|x| x.strip_suffix(b"}"))
        .ok_or_else(|| "not an array literal like {1,2,3}".to_string())?;
    let mut out = Vec::new();
    if inner.trim_ascii().is_empty() {
        return Ok(out);
    }
    let mut i = 0;
    loop {
        while inner.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        let mut elem = Vec::new();
        let quoted = inner.get(i) == Some(&b'"');
        if quoted {
            i += 1;
            loop {
                match inner.get(i) {
                    None => return Err("unterminated quoted element".into()),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        elem.push(*inner.get(i + 1).ok_or("dangling backslash")?);
                        i += 2;
                    }
                    Some(&c) => {
                        elem.push(c);
                        i += 1;
                    }
                }
            }
            i += 1;
        } else {
            while let Some(&c) = inner.get(i) {
                match c {
                    b',' => break,
                    b'{' | b'}' | b'"' => {
                        return Err("nested or malformed arrays are not keys".into())
                    }
                    b'\\' => {
                        elem.push(*inner.get(i + 1).ok_or("dangling backslash")?);
                        i += 2;
                    }
                    _ => {
                        elem.push(c);
                        i += 1;
                    }
                }
            }
            let trimmed = elem.trim_ascii().to_vec();
            elem = trimmed;
        }
        let is_null = !quoted && elem.eq_ignore_ascii_case(b"NULL");
        out.push((!is_null).then_some(elem));
        while inner.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        match inner.get(i) {
            None => return Ok(out),
            Some(b',') => i += 1,
            Some(_) => return Err("garbage after an element".into()),
        }
    }
}

/// Elements of a one-dimensional array in binary (array_send) form.
pub(super) fn parse_binary_array(b: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let i32_at = |at: usize| -> Result<i32, String> {
        b.get(at..at + 4)
            .map(|x| i32::from_be_bytes(x.try_into().expect("4")))
            .ok_or_else(|| "truncated binary array".to_string())
    };
    let ndim = i32_at(0)?;
    if ndim == 0 {
        return Ok(Vec::new());
    }
    if ndim != 1 {
        return Err(format!("a key array must have one dimension, not {ndim}"));
    }
    // ndim, has-null flag, element type oid, then (length, lower bound) of the dimension.
    let count = i32_at(12)?;
    let mut at = 20;
    // The count comes from the client: never reserve more than the bytes could hold.
    let mut out = Vec::with_capacity((count.max(0) as usize).min(b.len() / 4));
    for _ in 0..count {
        let len = i32_at(at)?;
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let end = at + len as usize;
        out.push(Some(
            b.get(at..end)
                .ok_or("truncated binary array element")?
                .to_vec(),
        ));
        at = end;
    }
    Ok(out)
}
