//! `--ctrl` and `--server`: where the control and data channels listen,
//! with swtpm's syntax and defaults.
//!
//! ```text
//! --ctrl   type=unixio,path=PATH[,mode=0770] | type=unixio,fd=N | type=unixio,clientfd=N
//!          type=tcp,port=P[,bindaddr=127.0.0.1] | type=tcp,fd=N          [,terminate]
//! --server [type=tcp,]port=P[,bindaddr=127.0.0.1] | type=tcp,fd=N
//!          type=unixio,path=PATH[,mode=0770] | type=unixio,fd=N
//! ```
//!
//! `fd=`/`clientfd=` name descriptors the parent left open; what they must
//! be is checked when they are taken over (`daemon::swtpm`), not here.

use super::{invalid, parse_fd, parse_kv, parse_mode, ConfigError};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// swtpm's default mode of a unix socket it creates.
pub const DEFAULT_UNIX_MODE: u32 = 0o770;

/// The socket family an inherited descriptor must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unix,
    /// `type=tcp`: TCP, or a unix socket (swtpm_setup hands a unix
    /// socketpair over as `--server type=tcp,fd=N`).
    Tcp,
}

/// Where a channel listens, or the connection it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix {
        path: PathBuf,
        mode: u32,
    },
    Tcp(SocketAddr),
    /// `fd=N`: an inherited socket, listening (or, for `--server`, also a
    /// connected one: then the one data connection).
    Fd {
        fd: i32,
        family: Family,
    },
    /// `--ctrl ...,clientfd=N`: an inherited, connected control client.
    ClientFd(i32),
}

impl Endpoint {
    /// The inherited descriptor this endpoint takes over, if any.
    pub fn fd(&self) -> Option<i32> {
        match self {
            Endpoint::Fd { fd, .. } | Endpoint::ClientFd(fd) => Some(*fd),
            _ => None,
        }
    }
}

/// Which channel an option describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Ctrl,
    Server,
}

/// Parses `--ctrl` (`Channel::Ctrl`; returns `terminate` too) or `--server`.
pub fn parse_endpoint(ch: Channel, s: &str) -> Result<(Endpoint, bool), ConfigError> {
    let opt = match ch {
        Channel::Ctrl => "--ctrl",
        Channel::Server => "--server",
    };
    let mut accepted = vec!["type", "path", "mode", "port", "bindaddr", "fd", "ifname"];
    match ch {
        Channel::Ctrl => accepted.extend(["clientfd", "terminate"]),
        Channel::Server => accepted.push("disconnect"),
    }
    let kv = parse_kv(opt, s, &accepted)?;
    if kv.contains_key("ifname") {
        return Err(invalid(
            opt,
            "ifname= (IPv6 link-local addresses) is not supported; bind to a global address",
        ));
    }
    if kv.contains_key("disconnect") {
        return Err(invalid(
            opt,
            "disconnect (close the data connection after every response) is not supported",
        ));
    }
    let terminate = kv.contains_key("terminate");
    // swtpm's defaults: `--server` without type= is TCP; `--ctrl` needs one.
    let ty = match (kv.get("type").map(String::as_str), ch) {
        (Some(t), _) => t,
        (None, Channel::Server) => "tcp",
        (None, Channel::Ctrl) => return Err(invalid(opt, "type= is required (unixio or tcp)")),
    };
    let only = |allowed: &[&str], what: &str| -> Result<(), ConfigError> {
        match kv
            .keys()
            .find(|k| !allowed.contains(&k.as_str()) && *k != "type" && *k != "terminate")
        {
            Some(k) => Err(invalid(opt, format!("{k}= does not go with {what}"))),
            None => Ok(()),
        }
    };
    let fd = kv.get("fd").map(|v| parse_fd(opt, "fd", v)).transpose()?;
    let clientfd = kv
        .get("clientfd")
        .map(|v| parse_fd(opt, "clientfd", v))
        .transpose()?;
    let ep = match ty {
        "unixio" => match (fd, clientfd, kv.get("path")) {
            (Some(fd), None, _) => {
                only(&["fd"], "fd=")?;
                Endpoint::Fd {
                    fd,
                    family: Family::Unix,
                }
            }
            (None, Some(fd), _) => {
                only(&["clientfd"], "clientfd=")?;
                Endpoint::ClientFd(fd)
            }
            (None, None, Some(p)) if !p.is_empty() => {
                only(&["path", "mode"], "type=unixio,path=")?;
                let mode = kv
                    .get("mode")
                    .map(|m| parse_mode(opt, m))
                    .transpose()?
                    .unwrap_or(DEFAULT_UNIX_MODE);
                Endpoint::Unix {
                    path: PathBuf::from(p),
                    mode,
                }
            }
            (Some(_), Some(_), _) => {
                return Err(invalid(opt, "fd= and clientfd= exclude each other"))
            }
            _ => {
                return Err(invalid(
                    opt,
                    "type=unixio needs path=PATH (or an inherited fd=N / clientfd=N)",
                ))
            }
        },
        "tcp" => {
            if clientfd.is_some() {
                return Err(invalid(opt, "clientfd= needs type=unixio"));
            }
            match fd {
                Some(fd) => {
                    only(&["fd"], "fd=")?;
                    Endpoint::Fd {
                        fd,
                        family: Family::Tcp,
                    }
                }
                None => {
                    only(&["port", "bindaddr"], "type=tcp")?;
                    let port = kv.get("port").ok_or_else(|| {
                        invalid(opt, "type=tcp needs port=N (or an inherited fd=N)")
                    })?;
                    let port: u16 = port.parse().map_err(|_| {
                        invalid(
                            opt,
                            format!("port '{port}' is not a number from 0 to 65535"),
                        )
                    })?;
                    let addr: IpAddr = match kv.get("bindaddr") {
                        Some(a) => {
                            a.trim_matches(|c| c == '[' || c == ']')
                                .parse()
                                .map_err(|_| {
                                    invalid(opt, format!("bindaddr '{a}' is not an IP address"))
                                })?
                        }
                        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    };
                    Endpoint::Tcp(SocketAddr::new(addr, port))
                }
            }
        }
        other => {
            return Err(invalid(
                opt,
                format!("type '{other}' is not supported (unixio or tcp)"),
            ))
        }
    };
    Ok((ep, terminate))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl(s: &str) -> Result<Endpoint, String> {
        parse_endpoint(Channel::Ctrl, s)
            .map(|(e, _)| e)
            .map_err(|e| e.to_string())
    }

    fn server(s: &str) -> Result<Endpoint, String> {
        parse_endpoint(Channel::Server, s)
            .map(|(e, _)| e)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn swtpm_setup_and_libvirt_forms() {
        assert_eq!(
            ctrl("type=unixio,clientfd=5").unwrap(),
            Endpoint::ClientFd(5)
        );
        assert_eq!(
            server("type=tcp,fd=6").unwrap(),
            Endpoint::Fd {
                fd: 6,
                family: Family::Tcp
            }
        );
        assert_eq!(
            server("type=unixio,fd=7").unwrap(),
            Endpoint::Fd {
                fd: 7,
                family: Family::Unix
            }
        );
        assert_eq!(
            ctrl("type=unixio,fd=8").unwrap(),
            Endpoint::Fd {
                fd: 8,
                family: Family::Unix
            }
        );
        assert_eq!(
            ctrl("type=tcp,fd=9").unwrap(),
            Endpoint::Fd {
                fd: 9,
                family: Family::Tcp
            }
        );
        assert_eq!(
            ctrl("type=unixio,path=/run/x.sock,mode=0600").unwrap(),
            Endpoint::Unix {
                path: "/run/x.sock".into(),
                mode: 0o600
            }
        );
        assert_eq!(
            ctrl("type=unixio,path=/x").unwrap(),
            Endpoint::Unix {
                path: "/x".into(),
                mode: 0o770
            },
            "swtpm's default mode"
        );
        assert_eq!(
            server("port=2321").unwrap(),
            Endpoint::Tcp("127.0.0.1:2321".parse().unwrap())
        );
        assert_eq!(
            server("type=tcp,port=2321,bindaddr=::1").unwrap(),
            Endpoint::Tcp("[::1]:2321".parse().unwrap())
        );
        let (_, t) = parse_endpoint(Channel::Ctrl, "type=unixio,clientfd=5,terminate").unwrap();
        assert!(t);
    }

    #[test]
    fn truncated_oversized_garbage() {
        let cases: &[(&str, &str)] = &[
            ("type=unixio,clientfd=", "clientfd="),
            ("type=unixio,fd=-3", "fd=-3"),
            ("type=unixio,fd=3x", "fd=3x"),
            ("type=unixio,fd=4294967299", "fd=4294967299"),
            ("type=unixio,fd=3,clientfd=4", "exclude each other"),
            ("type=unixio,fd=3,path=/x", "path= does not go with fd="),
            (
                "type=unixio,clientfd=3,mode=0600",
                "mode= does not go with clientfd=",
            ),
            ("type=tcp,clientfd=3", "clientfd= needs type=unixio"),
            ("type=tcp,fd=3,port=1", "port= does not go with fd="),
            ("type=tcp,port=1,path=/x", "path= does not go with type=tcp"),
            (
                "type=unixio,path=/x,port=1",
                "port= does not go with type=unixio",
            ),
            ("type=unixio", "needs path=PATH"),
            ("type=unixio,path=", "needs path=PATH"),
            ("type=tcp", "needs port=N"),
            ("type=tcp,port=65536", "65536"),
            ("type=tcp,port=-1", "-1"),
            ("type=tcp,port=1,bindaddr=localhost", "not an IP address"),
            ("type=tcp,port=1,ifname=eth0", "ifname="),
            ("type=vsock,port=1", "type 'vsock'"),
            ("port=1", "type= is required"),
            ("type=unixio,path=/x,mode=0999", "octal"),
            ("type=unixio,path=/x,bogus", "unknown parameter 'bogus'"),
        ];
        for (arg, want) in cases {
            let e = ctrl(arg).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
        }
        assert!(server("type=tcp,port=1,disconnect")
            .unwrap_err()
            .contains("disconnect"));
        assert!(server("type=unixio,clientfd=3")
            .unwrap_err()
            .contains("clientfd"));
        assert!(server(&"x".repeat(100_000)).is_err());
        assert!(server("\u{0}=\u{0}").is_err());
    }
}
