//! The russh server handler: authentication and channel opens.
//!
//! The handler stays thin. It decides routes (a table lookup) and answers
//! channel requests at once; everything that waits on the network (dialing a
//! target, an upstream login, moving bytes) runs in a task per channel, so a
//! slow or unreachable target never stalls this connection's other channels
//! or its keepalives.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{AuthInfo, Gateway, Limits, audit, budget, direct, relay};
use crate::keys::fingerprint;
use crate::routes::{Destination, Via};

/// The server configuration every connection shares.
pub fn server_config(host_key: ssh_key::PrivateKey, limits: &Limits) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard(
            concat!("SSH-2.0-Keyway_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Every rejection is the same table lookup; a short constant delay
        // flattens what timing difference remains without making a client
        // with several keys wait a second per key.
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        max_auth_attempts: 20,
        channel_buffer_size: limits.channel_buffer.max(1),
        // Windows follow consumption (flow.rs): a client can never make the
        // gateway hold more for a channel than its window.
        window_size: limits.window.initial,
        manual_window_adjust: true,
        // Authenticated sessions may idle for days; dead peers are found by
        // keepalives instead. The auth deadline covers the unauthenticated.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(SERVER_CIPHERS),
            kex: std::borrow::Cow::Owned(with_kex_extensions(&limits.kex)),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Key exchanges offered by default: elliptic-curve ones only. A
/// finite-field Diffie-Hellman exchange costs the server 10x (group14) to
/// 500x (group18) a curve25519 one, chosen by an unauthenticated peer
/// (DHEat, CVE-2002-20001): measured through a debug gateway, a failed
/// login took 0.09 s with curve25519, 0.31 s with group14, 2.4 s with
/// group16 and 19.5 s with group18. Group exchange lets the client ask for
/// up to 8192 bits and is never offered.
pub const DEFAULT_KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
];

/// What `--kex-algorithms` may name: the defaults, plus the two
/// finite-field groups some old clients need.
pub const ALLOWED_KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
    russh::kex::DH_G14_SHA256,
    russh::kex::DH_G16_SHA512,
];

/// Parses `--kex-algorithms`: known names only, in the given order.
pub fn parse_kex(names: &[String]) -> Result<Vec<russh::kex::Name>, String> {
    names
        .iter()
        .map(|n| {
            ALLOWED_KEX
                .iter()
                .find(|k| k.as_ref() == n.as_str())
                .copied()
                .ok_or_else(|| {
                    let allowed: Vec<&str> = ALLOWED_KEX.iter().map(|k| k.as_ref()).collect();
                    format!(
                        "--kex-algorithms: {n:?} is not offered (allowed: {}); larger finite-field groups and group exchange cost too much to offer unauthenticated peers",
                        allowed.join(", ")
                    )
                })
        })
        .collect()
}

/// The key exchanges plus russh's extension markers (ext-info, strict kex),
/// which ride in the same list.
fn with_kex_extensions(kex: &[russh::kex::Name]) -> Vec<russh::kex::Name> {
    let mut v = if kex.is_empty() {
        DEFAULT_KEX.to_vec()
    } else {
        kex.to_vec()
    };
    v.extend([
        russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
        russh::kex::EXTENSION_SUPPORT_AS_SERVER,
        russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
        russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ]);
    v
}

/// russh's defaults plus aes128-gcm, which OpenSSH clients are often
/// configured for; the client's order decides among them.
const SERVER_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// One client connection's handler.
pub struct Conn {
    gw: Arc<Gateway>,
    session: Arc<audit::Session>,
    peer: SocketAddr,
    dst: IpAddr,
    auth_tx: Option<oneshot::Sender<AuthInfo>>,
    cancel: CancellationToken,
    authed: Option<AuthInfo>,
    /// One permit per open channel (`Limits::max_channels`); each channel's
    /// task holds its permit until the channel ends.
    channels: Arc<Semaphore>,
}

impl Conn {
    pub fn new(
        gw: Arc<Gateway>,
        session: Arc<audit::Session>,
        auth_tx: oneshot::Sender<AuthInfo>,
        cancel: CancellationToken,
    ) -> Self {
        let channels = Arc::new(Semaphore::new(gw.limits.max_channels.max(1)));
        Conn {
            gw,
            peer: session.src,
            dst: crate::routes::canonical(session.dst.ip()),
            session,
            auth_tx: Some(auth_tx),
            cancel,
            authed: None,
            channels,
        }
    }

    /// A permit for one more channel, or `None` (counted and logged) when
    /// this connection already holds `max_channels`.
    fn channel_permit(&self, dest: &Destination, kind: &str) -> Option<OwnedSemaphorePermit> {
        let permit = self.channels.clone().try_acquire_owned().ok();
        if permit.is_none() {
            audit::Channel::new(&self.session, &dest.label, kind)
                .ended("refused: too many channels on this connection");
            self.gw
                .metrics
                .channels_refused
                .with_label_values(&["limit"])
                .inc();
            debug!(peer = %self.peer, max = self.gw.limits.max_channels, "channel refused: too many open channels");
        }
        permit
    }

    /// Reserves a new channel's windows from the budgets; a refusal is
    /// counted and logged, and its text is what the client is told.
    fn reserve(
        &self,
        dest: &Destination,
        kind: &str,
        bytes: u64,
    ) -> Result<budget::Channel, String> {
        self.gw.budgets.channel(&dest.tenant, bytes).map_err(|r| {
            self.gw.refused(&r);
            audit::Channel::new(&self.session, &dest.label, kind).ended(&format!("refused: {r}"));
            debug!(peer = %self.peer, to = %dest.label, "channel refused: {r}");
            r.to_string()
        })
    }

    fn decide(&self, user: &str, fp: Option<&str>) -> Option<Destination> {
        self.gw.table().decide(user, self.dst, fp)
    }

    fn reject(&self, method: &str) -> Auth {
        self.gw
            .metrics
            .auth_failures
            .with_label_values(&[method])
            .inc();
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        }
    }

    fn dest(&self) -> Option<Arc<Destination>> {
        self.authed.as_ref().map(|a| a.dest.clone())
    }
}

/// Runs a channel's task, giving its channel permit back when it ends.
fn spawn_channel(permit: OwnedSemaphorePermit, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        task.await;
        drop(permit);
    });
}

/// Errors end the connection; russh's own are enough.
pub type Error = russh::Error;

impl russh::server::Handler for Conn {
    type Error = Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Error> {
        match self.decide(user, None) {
            Some(d) => {
                self.authed = Some(AuthInfo {
                    user: user.to_string(),
                    dst: self.dst,
                    fingerprint: None,
                    dest: Arc::new(d),
                });
                Ok(Auth::Accept)
            }
            // Every OpenSSH client starts with `none`; not a failure.
            None => Ok(Auth::Reject {
                proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
                partial_success: false,
            }),
        }
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Error> {
        Ok(self.reject("password"))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        _user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Error> {
        Ok(self.reject("keyboard-interactive"))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Error> {
        // "Not this key" for keys that route nowhere, so OpenSSH offers the
        // next key in its agent instead of giving up.
        let fp = fingerprint(offer.public_key);
        if self.decide(user, Some(&fp)).is_some() {
            Ok(Auth::Accept)
        } else {
            Ok(self.reject("publickey"))
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Error> {
        let fp = fingerprint(key.public_key);
        match self.decide(user, Some(&fp)) {
            Some(d) => {
                self.authed = Some(AuthInfo {
                    user: user.to_string(),
                    dst: self.dst,
                    fingerprint: Some(fp),
                    dest: Arc::new(d),
                });
                Ok(Auth::Accept)
            }
            None => Ok(self.reject("publickey")),
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Error> {
        if let (Some(tx), Some(a)) = (self.auth_tx.take(), self.authed.clone()) {
            let _ = tx.send(a);
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Error> {
        let Some(dest) = self.dest() else {
            return Ok(()); // dropping `reply` refuses the channel
        };
        let Some(permit) = self.channel_permit(&dest, "session") else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let user = self
            .authed
            .as_ref()
            .map(|a| a.user.clone())
            .unwrap_or_default();
        debug!(peer = %self.peer, %user, to = %dest.label, "session channel");
        let budget = match self.reserve(
            &dest,
            "session",
            2 * u64::from(self.gw.limits.window.initial),
        ) {
            Ok(b) => b,
            Err(why) => {
                spawn_channel(permit, relay::refuse_session(channel, reply, why));
                return Ok(());
            }
        };
        spawn_channel(
            permit,
            relay::channel(
                self.gw.clone(),
                dest,
                relay::Open::Session,
                relay::Down {
                    session: self.session.clone(),
                    channel,
                    reply,
                    handle: session.handle(),
                },
                self.cancel.clone(),
                budget,
            ),
        );
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Error> {
        let Some(dest) = self.dest() else {
            return Ok(());
        };
        let Some(permit) = self.channel_permit(&dest, "direct-tcpip") else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        // Both directions' windows (a jump's target side is a fixed buffer).
        let bytes = match dest.via {
            Via::LeaseHash => u64::from(self.gw.limits.window.initial) + direct::COPY_BUF as u64,
            Via::PooledIp | Via::Route => 2 * u64::from(self.gw.limits.window.initial),
        };
        let Ok(budget) = self.reserve(&dest, "direct-tcpip", bytes) else {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        match dest.via {
            // The gateway is a jump host: the lease's own target and nothing
            // else, whatever host the client named (no open proxy).
            Via::LeaseHash => {
                spawn_channel(
                    permit,
                    direct::forward(
                        self.gw.clone(),
                        dest,
                        channel,
                        reply,
                        self.cancel.clone(),
                        budget,
                        self.session.clone(),
                    ),
                );
            }
            // The gateway stands in for the VM: `-L` forwards are the VM's to
            // make, through the upstream login.
            Via::PooledIp | Via::Route => {
                spawn_channel(
                    permit,
                    relay::channel(
                        self.gw.clone(),
                        dest,
                        relay::Open::DirectTcpip {
                            host: host_to_connect.to_string(),
                            port: port_to_connect,
                            originator_address: originator_address.to_string(),
                            originator_port,
                        },
                        relay::Down {
                            session: self.session.clone(),
                            channel,
                            reply,
                            handle: session.handle(),
                        },
                        self.cancel.clone(),
                        budget,
                    ),
                );
            }
        }
        Ok(())
    }

    // Requests on session channels are answered here, at once and in order:
    // russh keeps one "wants reply" flag per channel, so a reply sent later
    // from another task could land on the wrong request. The channel's task
    // receives the same requests (in order, with the data) and carries them
    // upstream; if the VM then refuses a shell, exec or subsystem, the task
    // reports it on stderr and closes the channel with status 1.

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_success(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Error> {
        session.channel_failure(channel)
    }
}
