//! The command table, the one place a command is looked up, checked (authentication, arity,
//! subscribed mode) and counted; and the connection and server commands: `HELLO`, `AUTH`,
//! `PING`, `ECHO`, `SELECT`, `QUIT`, `RESET`, `CLIENT …`, `INFO`, `CONFIG GET`, `COMMAND …`,
//! `SUBSCRIBE` (to the tracking channel), `TIME`.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::commands as data;
use super::reply::Reply;
use super::session::{Session, TrackState};
use super::{Front, REDIS_VERSION};

/// The channel a RESP2 client subscribes to to receive redirected invalidations.
pub const INVALIDATE_CHANNEL: &str = "__redis__:invalidate";

/// One command as `COMMAND` describes it (Redis's arity rule: `n` exactly n arguments counting
/// the name, `-n` at least n).
pub struct Spec {
    pub name: &'static str,
    pub arity: i64,
    pub flags: &'static [&'static str],
    pub first_key: i64,
    pub last_key: i64,
    pub step: i64,
    pub group: &'static str,
    pub summary: &'static str,
}

const fn spec(
    name: &'static str,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
    group: &'static str,
    summary: &'static str,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
        group,
        summary,
    }
}

const R: &[&str] = &["readonly", "fast"];
const W: &[&str] = &["write", "denyoom"];
const WF: &[&str] = &["write", "fast"];
const C: &[&str] = &["fast", "stale", "loading"];
const NOKEY: (i64, i64, i64) = (0, 0, 0);
const ONE: (i64, i64, i64) = (1, 1, 1);
const ALL: (i64, i64, i64) = (1, -1, 1);

/// Every command this front knows.
pub const COMMANDS: &[Spec] = &[
    spec("get", 2, R, ONE, "string", "Returns the value of a key."),
    spec(
        "set",
        -3,
        W,
        ONE,
        "string",
        "Sets a key's value, with NX/XX/GET and an expiry.",
    ),
    spec(
        "setnx",
        3,
        W,
        ONE,
        "string",
        "Sets a key's value only when it does not exist.",
    ),
    spec(
        "setex",
        4,
        W,
        ONE,
        "string",
        "Sets a key's value and its expiry in seconds.",
    ),
    spec(
        "psetex",
        4,
        W,
        ONE,
        "string",
        "Sets a key's value and its expiry in milliseconds.",
    ),
    spec(
        "getset",
        3,
        W,
        ONE,
        "string",
        "Sets a key's value and returns the old one.",
    ),
    spec(
        "getdel",
        2,
        WF,
        ONE,
        "string",
        "Returns a key's value and deletes the key.",
    ),
    spec(
        "getex",
        -2,
        WF,
        ONE,
        "string",
        "Returns a key's value, optionally changing its expiry.",
    ),
    spec("mget", -2, R, ALL, "string", "Returns the values of several keys."),
    spec("mset", -3, W, (1, -1, 2), "string", "Sets several keys."),
    spec("strlen", 2, R, ONE, "string", "Returns the length of a key's value."),
    spec(
        "append",
        3,
        W,
        ONE,
        "string",
        "Appends to a key's value (in-memory keyspaces).",
    ),
    spec(
        "incr",
        2,
        W,
        ONE,
        "string",
        "Adds one to a key's integer value (in-memory keyspaces).",
    ),
    spec(
        "decr",
        2,
        W,
        ONE,
        "string",
        "Subtracts one from a key's integer value (in-memory keyspaces).",
    ),
    spec(
        "incrby",
        3,
        W,
        ONE,
        "string",
        "Adds to a key's integer value (in-memory keyspaces).",
    ),
    spec(
        "decrby",
        3,
        W,
        ONE,
        "string",
        "Subtracts from a key's integer value (in-memory keyspaces).",
    ),
    spec("del", -2, &["write"], ALL, "generic", "Deletes keys."),
    spec("unlink", -2, WF, ALL, "generic", "Deletes keys."),
    spec("exists", -2, R, ALL, "generic", "Counts the given keys that exist."),
    spec(
        "expire",
        -3,
        WF,
        ONE,
        "generic",
        "Sets a key's expiry in seconds (in-memory keyspaces).",
    ),
    spec(
        "pexpire",
        -3,
        WF,
        ONE,
        "generic",
        "Sets a key's expiry in milliseconds (in-memory keyspaces).",
    ),
    spec(
        "expireat",
        -3,
        WF,
        ONE,
        "generic",
        "Sets a key's expiry as a unix time (in-memory keyspaces).",
    ),
    spec(
        "pexpireat",
        -3,
        WF,
        ONE,
        "generic",
        "Sets a key's expiry as a unix time in ms (in-memory keyspaces).",
    ),
    spec(
        "ttl",
        2,
        R,
        ONE,
        "generic",
        "Returns a key's remaining life in seconds.",
    ),
    spec(
        "pttl",
        2,
        R,
        ONE,
        "generic",
        "Returns a key's remaining life in milliseconds.",
    ),
    spec(
        "persist",
        2,
        WF,
        ONE,
        "generic",
        "Removes a key's own expiry (in-memory keyspaces).",
    ),
    spec("type", 2, R, ONE, "generic", "Returns the type of a key's value."),
    spec(
        "scan",
        -2,
        &["readonly"],
        NOKEY,
        "generic",
        "Iterates the keys of the in-memory keyspaces.",
    ),
    spec(
        "keys",
        2,
        &["readonly"],
        NOKEY,
        "generic",
        "Returns the keys of the in-memory keyspaces matching a pattern.",
    ),
    spec("dbsize", 1, R, NOKEY, "server", "Returns the number of cached entries."),
    spec("ping", -1, C, NOKEY, "connection", "Returns PONG, or the argument."),
    spec("echo", 2, C, NOKEY, "connection", "Returns the argument."),
    spec(
        "select",
        2,
        C,
        NOKEY,
        "connection",
        "Selects database 0 (the only one).",
    ),
    spec(
        "hello",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEY,
        "connection",
        "Handshakes: protocol version, authentication, name.",
    ),
    spec(
        "auth",
        -2,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEY,
        "connection",
        "Authenticates the connection.",
    ),
    spec(
        "quit",
        -1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEY,
        "connection",
        "Closes the connection.",
    ),
    spec(
        "reset",
        1,
        &["noscript", "loading", "stale", "fast", "no_auth"],
        NOKEY,
        "connection",
        "Resets the connection's state.",
    ),
    spec(
        "client",
        -2,
        &["noscript", "loading", "stale"],
        NOKEY,
        "connection",
        "Connection commands: ID, SETNAME, GETNAME, SETINFO, LIST, INFO, TRACKING, CACHING…",
    ),
    spec(
        "info",
        -1,
        &["loading", "stale"],
        NOKEY,
        "server",
        "Returns information about the server.",
    ),
    spec(
        "config",
        -2,
        &["loading", "stale"],
        NOKEY,
        "server",
        "CONFIG GET: the settings clients ask for.",
    ),
    spec(
        "command",
        -1,
        &["loading", "stale"],
        NOKEY,
        "server",
        "Describes the commands.",
    ),
    spec(
        "subscribe",
        -2,
        &["pubsub", "noscript", "loading", "stale"],
        NOKEY,
        "pubsub",
        "Subscribes to __redis__:invalidate (client tracking).",
    ),
    spec(
        "unsubscribe",
        -1,
        &["pubsub", "noscript", "loading", "stale"],
        NOKEY,
        "pubsub",
        "Unsubscribes.",
    ),
    spec(
        "time",
        1,
        &["loading", "stale", "fast"],
        NOKEY,
        "server",
        "Returns the server time.",
    ),
];

/// The index of a command in [`COMMANDS`] (`name` lowercase).
fn find(name: &str) -> Option<usize> {
    COMMANDS.iter().position(|c| c.name == name)
}

fn wrong_args(name: &str) -> Reply {
    Reply::err(format!("ERR wrong number of arguments for '{name}' command"))
}

/// Redis's answer to a command it does not know.
fn unknown(args: &[Bytes]) -> Reply {
    let mut text = format!(
        "ERR unknown command '{}', with args beginning with: ",
        printable(&args[0], 128)
    );
    for a in args.iter().skip(1).take(8) {
        text.push_str(&format!("'{}' ", printable(a, 128)));
    }
    Reply::err(text)
}

/// Bytes shown in an error: printable ASCII, others as `\xNN`, at most `max` of them.
fn printable(b: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &c in b.iter().take(max) {
        if c.is_ascii_graphic() || c == b' ' {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\x{c:02x}"));
        }
    }
    s
}

/// A command name lowercased into a stack buffer (no allocation per command); `None` when
/// longer than any known command.
fn lowercase<'b>(name: &[u8], buf: &'b mut [u8; 24]) -> Option<&'b str> {
    let out = buf.get_mut(..name.len())?;
    for (o, c) in out.iter_mut().zip(name) {
        *o = c.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

/// Runs one command for session `s`; counts it in `s`'s batch tally (see [`Session::tally`]).
pub async fn execute(front: &Front, s: &mut Session, args: Vec<Bytes>) -> Reply {
    let mut buf = [0u8; 24];
    let index = lowercase(&args[0], &mut buf).and_then(find);
    let reply = match index {
        None => unknown(&args),
        Some(i) => {
            let spec = &COMMANDS[i];
            let n = args.len() as i64;
            if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
                wrong_args(spec.name)
            } else if !s.authed && !spec.flags.contains(&"no_auth") {
                Reply::err("NOAUTH Authentication required.")
            } else if s.subscribed
                && s.proto < 3
                && !matches!(spec.name, "subscribe" | "unsubscribe" | "ping" | "quit" | "reset")
            {
                Reply::err(format!(
                    "ERR Can't execute '{}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context",
                    spec.name
                ))
            } else if front.tracking.any_noloop() && spec.flags.contains(&"write") {
                // NOLOOP needs to know who changes a key; only then is the write scoped.
                super::tracking::CURRENT
                    .scope(s.id, run(front, s, spec.name, &args))
                    .await
            } else {
                run(front, s, spec.name, &args).await
            }
        }
    };
    s.tally(index, !reply.is_error());
    if let Some(i) = index {
        s.info.last_cmd.store(i, Ordering::Relaxed);
        // CLIENT CACHING applies to the one command after it.
        if COMMANDS[i].name != "client" {
            s.caching = None;
        }
    } else {
        s.caching = None;
    }
    reply
}

async fn run(front: &Front, s: &mut Session, name: &str, args: &[Bytes]) -> Reply {
    match name {
        "get" => data::get(front, s, args).await,
        "set" => data::set(front, args).await,
        "setnx" | "setex" | "psetex" | "getset" => data::set_variant(front, name, args).await,
        "getdel" => data::getdel(front, args).await,
        "getex" => data::getex(front, s, args).await,
        "mget" => data::mget(front, s, args).await,
        "mset" => data::mset(front, args).await,
        "strlen" => data::strlen(front, s, args).await,
        "append" => data::append(front, args).await,
        "incr" => data::incr(front, args, Some(1)).await,
        "decr" => data::incr(front, args, Some(-1)).await,
        "incrby" | "decrby" => data::incr(front, args, None).await,
        "del" | "unlink" => data::del(front, args).await,
        "exists" => data::exists(front, s, args).await,
        "expire" | "pexpire" | "expireat" | "pexpireat" => data::expire(front, name, args).await,
        "ttl" => data::ttl(front, s, args, false).await,
        "pttl" => data::ttl(front, s, args, true).await,
        "persist" => data::persist(front, args).await,
        "type" => data::type_of(front, s, args).await,
        "scan" => data::scan(front, args).await,
        "keys" => data::keys(front, args).await,
        "dbsize" => data::dbsize(front).await,
        "ping" => ping(s, args),
        "echo" => Reply::Bulk(args[1].clone()),
        "select" => match data::int_arg(&args[1]) {
            Ok(0) => Reply::Ok,
            Ok(_) => Reply::err("ERR DB index is out of range"),
            Err(r) => r,
        },
        "hello" => hello(front, s, args),
        "auth" => auth(front, s, &args[1..]),
        "quit" => {
            s.closing = true;
            Reply::Ok
        }
        "reset" => {
            reset(front, s);
            Reply::Simple("RESET")
        }
        "client" => client(front, s, args),
        "info" => info(front, args).await,
        "config" => config(front, args),
        "command" => command(args),
        "subscribe" => subscribe(s, args),
        "unsubscribe" => unsubscribe(s),
        "time" => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            Reply::Array(vec![
                Reply::bulk(now.as_secs().to_string()),
                Reply::bulk(now.subsec_micros().to_string()),
            ])
        }
        _ => unknown(args),
    }
}

fn ping(s: &Session, args: &[Bytes]) -> Reply {
    if args.len() > 2 {
        return wrong_args("ping");
    }
    if s.subscribed && s.proto < 3 {
        return Reply::Array(vec![
            Reply::bulk("pong"),
            Reply::Bulk(args.get(1).cloned().unwrap_or_default()),
        ]);
    }
    match args.get(1) {
        Some(m) => Reply::Bulk(m.clone()),
        None => Reply::Simple("PONG"),
    }
}

/// Checks a password (and user: only `default` exists) in time that depends only on lengths.
fn password_ok(front: &Front, user: Option<&[u8]>, password: &[u8]) -> bool {
    let Some(secret) = &front.config.password else {
        return false;
    };
    crate::credential::same_secret(password, secret.expose().as_bytes()) && user.is_none_or(|u| u == b"default")
}

fn auth(front: &Front, s: &mut Session, args: &[Bytes]) -> Reply {
    if args.len() > 2 {
        return Reply::err(data::SYNTAX);
    }
    if front.config.password.is_none() {
        return Reply::err(
            "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
        );
    }
    let (user, pass) = match args {
        [p] => (None, p),
        [u, p] => (Some(&u[..]), p),
        _ => return Reply::err(data::SYNTAX),
    };
    if password_ok(front, user, pass) {
        s.authed = true;
        Reply::Ok
    } else {
        Reply::err("WRONGPASS invalid username-password pair or user is disabled.")
    }
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`
fn hello(front: &Front, s: &mut Session, args: &[Bytes]) -> Reply {
    let mut proto = s.proto;
    if let Some(v) = args.get(1) {
        match data::int_arg(v) {
            Ok(v @ (2 | 3)) => proto = v as u8,
            Ok(_) => return Reply::err("NOPROTO unsupported protocol version"),
            Err(_) => return Reply::err("ERR Protocol version is not an integer or out of range"),
        }
    }
    let mut i = 2;
    let mut name = None;
    while i < args.len() {
        let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
        match opt.as_str() {
            "auth" if i + 2 < args.len() => {
                if front.config.password.is_none() {
                    return Reply::err(
                        "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
                    );
                }
                if !password_ok(front, Some(&args[i + 1]), &args[i + 2]) {
                    return Reply::err("WRONGPASS invalid username-password pair or user is disabled.");
                }
                s.authed = true;
                i += 3;
            }
            "setname" if i + 1 < args.len() => {
                name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => return Reply::err(format!("ERR Syntax error in HELLO option '{opt}'")),
        }
    }
    if !s.authed {
        return Reply::err(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
        );
    }
    if let Some(n) = name
        && let Err(r) = set_name(s, &n)
    {
        return r;
    }
    s.proto = proto;
    s.info.proto.store(proto, Ordering::Relaxed);
    Reply::Map(vec![
        (Reply::bulk("server"), Reply::bulk("redis")),
        (Reply::bulk("version"), Reply::bulk(REDIS_VERSION)),
        (Reply::bulk("proto"), Reply::Int(proto as i64)),
        (Reply::bulk("id"), Reply::Int(s.id as i64)),
        (Reply::bulk("mode"), Reply::bulk("standalone")),
        (Reply::bulk("role"), Reply::bulk("master")),
        (Reply::bulk("modules"), Reply::Array(vec![])),
        (Reply::bulk("cachesync"), Reply::bulk(env!("CARGO_PKG_VERSION"))),
    ])
}

fn reset(front: &Front, s: &mut Session) {
    front.tracking.disable(s.id);
    s.tracking = None;
    s.caching = None;
    s.subscribed = false;
    s.proto = 2;
    s.info.proto.store(2, Ordering::Relaxed);
    s.authed = front.config.password.is_none();
    let mut n = s.info.names.lock().unwrap_or_else(|p| p.into_inner());
    n.name.clear();
    n.tracking = false;
}

fn set_name(s: &Session, name: &[u8]) -> Result<(), Reply> {
    if name.iter().any(|c| !(33..=126).contains(c)) {
        return Err(Reply::err(
            "ERR Client names cannot contain spaces, newlines or special characters.",
        ));
    }
    s.info.names.lock().unwrap_or_else(|p| p.into_inner()).name = String::from_utf8_lossy(name).into_owned();
    Ok(())
}

/// One `CLIENT LIST` line.
fn client_line(c: &super::ClientInfo) -> String {
    let n = c.names.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let last_cmd = COMMANDS
        .get(c.last_cmd.load(Ordering::Relaxed))
        .map_or("NULL", |s| s.name);
    let age = c.created.elapsed().as_secs();
    let idle = c
        .created
        .elapsed()
        .as_millis()
        .saturating_sub(c.last_active_ms.load(Ordering::Relaxed) as u128)
        / 1000;
    format!(
        "id={} addr={} laddr={} fd=-1 name={} age={age} idle={idle} flags={} db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=0 qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user=default redir=-1 resp={} lib-name={} lib-ver={}",
        c.id,
        c.addr,
        c.laddr,
        n.name,
        if n.tracking { "t" } else { "N" },
        last_cmd,
        c.proto.load(Ordering::Relaxed),
        n.lib_name,
        n.lib_ver,
    )
}

fn client(front: &Front, s: &mut Session, args: &[Bytes]) -> Reply {
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    let argc = args.len();
    match (sub.as_str(), argc) {
        ("id", 2) => Reply::Int(s.id as i64),
        ("setname", 3) => match set_name(s, &args[2]) {
            Ok(()) => Reply::Ok,
            Err(r) => r,
        },
        ("getname", 2) => {
            let n = s.info.names.lock().unwrap_or_else(|p| p.into_inner()).name.clone();
            if n.is_empty() { Reply::Nil } else { Reply::bulk(n) }
        }
        ("setinfo", 4) => {
            let attr = String::from_utf8_lossy(&args[2]).to_ascii_lowercase();
            let value = String::from_utf8_lossy(&args[3]).into_owned();
            if value.chars().any(|c| !c.is_ascii_graphic()) {
                return Reply::err(format!(
                    "ERR {attr} cannot contain spaces, newlines or special characters."
                ));
            }
            let mut n = s.info.names.lock().unwrap_or_else(|p| p.into_inner());
            match attr.as_str() {
                "lib-name" => n.lib_name = value,
                "lib-ver" => n.lib_ver = value,
                _ => return Reply::err(format!("ERR Unrecognized option '{attr}'")),
            }
            Reply::Ok
        }
        ("list", _) => {
            let text: String = front.client_list().iter().map(|c| client_line(c) + "\n").collect();
            Reply::Verbatim(text)
        }
        ("info", 2) => Reply::Verbatim(client_line(&s.info) + "\n"),
        ("tracking", _) => tracking(front, s, &args[2..]),
        ("caching", 3) => {
            let Some(t) = &s.tracking else {
                return Reply::err(
                    "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
                );
            };
            let yes = args[2].eq_ignore_ascii_case(b"yes");
            let no = args[2].eq_ignore_ascii_case(b"no");
            match (yes, no, t.optin, t.optout) {
                (true, _, true, _) => s.caching = Some(true),
                (_, true, _, true) => s.caching = Some(false),
                (true, _, false, _) => {
                    return Reply::err("ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.");
                }
                (_, true, _, false) => {
                    return Reply::err("ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.");
                }
                _ => return Reply::err(data::SYNTAX),
            }
            Reply::Ok
        }
        ("getredir", 2) => Reply::Int(match &s.tracking {
            None => -1,
            Some(t) => t.mode.redirect.map_or(0, |r| r as i64),
        }),
        ("trackinginfo", 2) => {
            let (flags, redirect, prefixes) = match &s.tracking {
                None => (vec![Reply::bulk("off")], -1, vec![]),
                Some(t) => {
                    let mut f = vec![Reply::bulk("on")];
                    for (on, name) in [
                        (t.mode.bcast.is_some(), "bcast"),
                        (t.optin, "optin"),
                        (t.optout, "optout"),
                        (t.mode.noloop, "noloop"),
                    ] {
                        if on {
                            f.push(Reply::bulk(name));
                        }
                    }
                    (
                        f,
                        t.mode.redirect.map_or(0, |r| r as i64),
                        t.mode
                            .bcast
                            .clone()
                            .unwrap_or_default()
                            .into_iter()
                            .map(Reply::Bulk)
                            .collect(),
                    )
                }
            };
            Reply::Map(vec![
                (Reply::bulk("flags"), Reply::Set(flags)),
                (Reply::bulk("redirect"), Reply::Int(redirect)),
                (Reply::bulk("prefixes"), Reply::Array(prefixes)),
            ])
        }
        ("no-evict" | "no-touch", 3) => Reply::Ok,
        ("help", 2) => Reply::Array(
            [
                "CLIENT <subcommand> [<arg> ...]. Subcommands are:",
                "ID, SETNAME <name>, GETNAME, SETINFO LIB-NAME|LIB-VER <value>, LIST, INFO,",
                "TRACKING (ON|OFF) [REDIRECT <id>] [BCAST] [PREFIX <p> ...] [OPTIN] [OPTOUT] [NOLOOP],",
                "CACHING (YES|NO), GETREDIR, TRACKINGINFO, HELP",
            ]
            .iter()
            .map(|l| Reply::Status(l.to_string()))
            .collect(),
        ),
        _ => Reply::err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CLIENT HELP.",
            printable(&args[1], 64)
        )),
    }
}

/// `CLIENT TRACKING on|off [REDIRECT id] [PREFIX p …] [BCAST] [OPTIN] [OPTOUT] [NOLOOP]`
fn tracking(front: &Front, s: &mut Session, args: &[Bytes]) -> Reply {
    let Some(onoff) = args.first() else {
        return Reply::err(data::SYNTAX);
    };
    if onoff.eq_ignore_ascii_case(b"off") {
        front.tracking.disable(s.id);
        s.tracking = None;
        s.info.names.lock().unwrap_or_else(|p| p.into_inner()).tracking = false;
        return Reply::Ok;
    }
    if !onoff.eq_ignore_ascii_case(b"on") {
        return Reply::err(data::SYNTAX);
    }
    let mut t = TrackState::default();
    let (mut bcast, mut prefixes) = (false, Vec::new());
    let mut i = 1;
    while i < args.len() {
        let opt = String::from_utf8_lossy(&args[i]).to_ascii_lowercase();
        match opt.as_str() {
            "redirect" if i + 1 < args.len() => {
                let Ok(id) = data::int_arg(&args[i + 1]) else {
                    return Reply::err(data::NOT_AN_INTEGER);
                };
                if id as u64 != s.id && !front.tracking.exists(id as u64) {
                    return Reply::err("ERR The client ID you want redirect to does not exist");
                }
                t.mode.redirect = (id as u64 != s.id).then_some(id as u64);
                i += 1;
            }
            "prefix" if i + 1 < args.len() => {
                prefixes.push(args[i + 1].clone());
                i += 1;
            }
            "bcast" => bcast = true,
            "optin" => t.optin = true,
            "optout" => t.optout = true,
            "noloop" => t.mode.noloop = true,
            _ => return Reply::err(data::SYNTAX),
        }
        i += 1;
    }
    if !bcast && !prefixes.is_empty() {
        return Reply::err("ERR PREFIX option requires BCAST mode to be enabled");
    }
    if bcast && (t.optin || t.optout) {
        return Reply::err("ERR OPTIN and OPTOUT are not compatible with BCAST");
    }
    if t.optin && t.optout {
        return Reply::err("ERR You can't use both OPTIN and OPTOUT");
    }
    if s.proto < 3 && t.mode.redirect.is_none() {
        // As Redis: RESP2 cannot carry pushes on the same connection; tracking is still on,
        // but the client must redirect to receive anything. Accepted for compatibility.
    }
    if bcast {
        t.mode.bcast = Some(prefixes);
    }
    front.tracking.enable(s.id, t.mode.clone());
    s.tracking = Some(t);
    s.info.names.lock().unwrap_or_else(|p| p.into_inner()).tracking = true;
    Reply::Ok
}

fn subscribe(s: &mut Session, args: &[Bytes]) -> Reply {
    let mut replies = Vec::new();
    for ch in &args[1..] {
        if &ch[..] != INVALIDATE_CHANNEL.as_bytes() {
            replies.push(Reply::err(format!(
                "ERR cachesync has no general pub/sub: SUBSCRIBE takes only {INVALIDATE_CHANNEL} (client-side caching)"
            )));
            continue;
        }
        s.subscribed = true;
        replies.push(Reply::Push(vec![
            Reply::bulk("subscribe"),
            Reply::Bulk(ch.clone()),
            Reply::Int(1),
        ]));
    }
    Reply::Seq(replies)
}

fn unsubscribe(s: &mut Session) -> Reply {
    let was = s.subscribed;
    s.subscribed = false;
    Reply::Push(vec![
        Reply::bulk("unsubscribe"),
        if was {
            Reply::bulk(INVALIDATE_CHANNEL)
        } else {
            Reply::Nil
        },
        Reply::Int(0),
    ])
}

/// `INFO [section …]`: server, clients, stats, keyspace (all of them by default).
async fn info(front: &Front, args: &[Bytes]) -> Reply {
    let wanted: Vec<String> = args[1..]
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let all = wanted.is_empty() || wanted.iter().any(|w| w == "all" || w == "everything" || w == "default");
    let want = |s: &str| all || wanted.iter().any(|w| w == s);
    let mut out = String::new();
    let uptime = front.started.elapsed().as_secs();
    if want("server") {
        out.push_str(&format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\ncachesync_version:{}\r\nos:{}\r\narch_bits:64\r\nprocess_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            front.config.listen.port(),
            uptime / 86_400,
        ));
    }
    if want("clients") {
        let clients = front.client_list();
        let tracking = clients
            .iter()
            .filter(|c| c.names.lock().unwrap_or_else(|p| p.into_inner()).tracking)
            .count();
        out.push_str(&format!(
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\ntracking_clients:{tracking}\r\nblocked_clients:0\r\n\r\n",
            clients.len(),
            front.config.max_clients,
        ));
    }
    if want("stats") {
        let (mut hits, mut misses) = (0, 0);
        for p in front.state.pipelines.values() {
            let m = &p.keyspace().m;
            hits += m.hits_l1.get() + m.hits_l2.get();
            misses += m.misses.get();
        }
        out.push_str(&format!(
            "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\ntotal_net_input_bytes:{}\r\ntotal_net_output_bytes:{}\r\nrejected_connections:{}\r\nkeyspace_hits:{hits}\r\nkeyspace_misses:{misses}\r\n\r\n",
            front.stats.connections_received.load(Ordering::Relaxed),
            front.stats.commands_processed.load(Ordering::Relaxed),
            front.metrics.bytes_in.get(),
            front.metrics.bytes_out.get(),
            front.stats.rejected_connections.load(Ordering::Relaxed),
        ));
    }
    if want("keyspace") {
        // Each keyspace's size once (a size settles moka's pending bookkeeping first).
        let mut lines = String::new();
        let mut keys = 0;
        for p in front.state.pipelines.values() {
            let ks = p.keyspace();
            let entries = ks.stats().await.entries;
            keys += entries;
            let source = if p.is_in_memory() { "memory" } else { "table" };
            lines.push_str(&format!(
                "cachesync_keyspace_{}:entries={entries},source={source}\r\n",
                ks.name()
            ));
        }
        out.push_str("# Keyspace\r\n");
        if keys > 0 {
            out.push_str(&format!("db0:keys={keys},expires=0,avg_ttl=0\r\n"));
        }
        out.push_str(&lines);
        out.push_str("\r\n");
    }
    Reply::Verbatim(out)
}

/// The settings `CONFIG GET` answers (what redis-benchmark and common clients ask for).
fn settings(front: &Front) -> Vec<(&'static str, String)> {
    let c = &front.config;
    vec![
        ("save", String::new()),
        ("appendonly", "no".into()),
        ("databases", "1".into()),
        ("maxmemory", "0".into()),
        ("maxmemory-policy", "allkeys-lru".into()),
        ("maxclients", c.max_clients.to_string()),
        ("timeout", c.idle_timeout.map_or(0, |d| d.as_secs()).to_string()),
        ("proto-max-bulk-len", c.max_bulk_bytes.to_string()),
        ("client-query-buffer-limit", c.max_query_bytes.to_string()),
        ("tracking-table-max-keys", c.tracking_max_keys.to_string()),
        ("port", c.listen.port().to_string()),
        ("bind", c.listen.ip().to_string()),
        ("cluster-enabled", "no".into()),
    ]
}

fn config(front: &Front, args: &[Bytes]) -> Reply {
    let sub = String::from_utf8_lossy(&args[1]).to_ascii_lowercase();
    match sub.as_str() {
        "get" if args.len() >= 3 => {
            let mut pairs = Vec::new();
            for (name, value) in settings(front) {
                if args[2..]
                    .iter()
                    .any(|p| data::glob(&p.to_ascii_lowercase(), name.as_bytes()))
                {
                    pairs.push((Reply::bulk(name), Reply::bulk(value)));
                }
            }
            Reply::Map(pairs)
        }
        "set" => {
            Reply::err("ERR CONFIG SET is not supported: cachesync is configured by its file ([resp], [[keyspace]])")
        }
        "resetstat" => Reply::Ok,
        _ => Reply::err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try CONFIG HELP.",
            printable(&args[1], 64)
        )),
    }
}

fn command_info(c: &Spec) -> Reply {
    Reply::Array(vec![
        Reply::bulk(c.name),
        Reply::Int(c.arity),
        Reply::Set(c.flags.iter().map(|f| Reply::Status(f.to_string())).collect()),
        Reply::Int(c.first_key),
        Reply::Int(c.last_key),
        Reply::Int(c.step),
        Reply::Set(vec![Reply::Status(format!("@{}", c.group))]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
    ])
}

fn command(args: &[Bytes]) -> Reply {
    let Some(sub) = args.get(1) else {
        return Reply::Array(COMMANDS.iter().map(command_info).collect());
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_lowercase();
    let named = || -> Vec<&'static Spec> {
        if args.len() == 2 {
            return COMMANDS.iter().collect();
        }
        args[2..]
            .iter()
            .filter_map(|a| find(&String::from_utf8_lossy(a).to_ascii_lowercase()).map(|i| &COMMANDS[i]))
            .collect()
    };
    match sub.as_str() {
        "count" => Reply::Int(COMMANDS.len() as i64),
        "list" => Reply::Array(COMMANDS.iter().map(|c| Reply::bulk(c.name)).collect()),
        "info" => Reply::Array(
            args[2..]
                .iter()
                .map(|a| match find(&String::from_utf8_lossy(a).to_ascii_lowercase()) {
                    Some(i) => command_info(&COMMANDS[i]),
                    None => Reply::NilArray,
                })
                .collect(),
        ),
        "docs" => Reply::Map(
            named()
                .into_iter()
                .map(|c| {
                    (
                        Reply::bulk(c.name),
                        Reply::Map(vec![
                            (Reply::bulk("summary"), Reply::bulk(c.summary)),
                            (Reply::bulk("since"), Reply::bulk("1.0.0")),
                            (Reply::bulk("group"), Reply::bulk(c.group)),
                        ]),
                    )
                })
                .collect(),
        ),
        _ => Reply::err(format!(
            "ERR unknown subcommand or wrong number of arguments for '{}'. Try COMMAND HELP.",
            printable(&args[1], 64)
        )),
    }
}
