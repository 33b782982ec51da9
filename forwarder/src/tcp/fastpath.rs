//! `tcp_fastpath = "xdp"`: what a connection's two legs must agree on to be spliced
//! in XDP, and the pair of `SPLICES` entries that splices them (docs/tcp.md, "XDP
//! splice"). Pure: the socket state comes in as [`LegState`], read elsewhere.

use std::fmt;
use std::net::SocketAddr;

use forwarder_common::{
    SPLICE_HOLD, SPLICE_SACK, SPLICE_TIMESTAMPS, SPLICE_TO_ORIGIN, SpliceEntry, SpliceKey,
};

use crate::datapath::addr16;

/// One leg's TCP state at splice time, as the agent's socket on it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegState {
    /// The agent's end and the peer's.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Next sequence number the agent's socket sends (its send queue is empty).
    pub snd_nxt: u32,
    /// Next sequence number it expects from the peer (its receive queue is empty).
    pub rcv_nxt: u32,
    /// Window scaling negotiated on this leg, and the shifts: `snd_wscale` is the
    /// peer's (windows the peer sends are scaled by it), `rcv_wscale` the agent's
    /// (windows the agent sends, as the peer reads them).
    pub wscale: bool,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub timestamps: bool,
    pub sack: bool,
    /// The socket's own timestamp clock (`TCP_TIMESTAMP`): the last TSval the peer
    /// saw from this leg is at most this.
    pub ts_clock: u32,
    /// Urgent data was seen or is pending.
    pub urgent: bool,
    /// Interface the leg's segments leave by.
    pub ifindex: u32,
    /// The MSS the agent offered the peer (`tcpi_advmss`): the largest segment,
    /// options included, the peer may send on this leg.
    pub advmss: u32,
    /// The MTU of the leg's route (`IP_MTU`/`IPV6_MTU`; 0: not known), which the
    /// program's route cache checks every translated segment against.
    pub path_mtu: u32,
}

/// IP and TCP header bytes (without options) of a segment of this leg's family.
fn headers(leg: &LegState) -> u32 {
    if leg.local.is_ipv4() { 40 } else { 60 }
}

/// Why a connection stays on the socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ineligible {
    /// The connection ended without moving the handoff's byte threshold within
    /// its window (counted at its end): not worth a handoff (no repair call, no
    /// map update was made).
    Short,
    /// One leg is IPv4, the other IPv6.
    MixedFamilies,
    /// One leg negotiated timestamps, the other did not.
    Timestamps,
    /// One leg negotiated SACK, the other did not.
    Sack,
    /// One leg negotiated window scaling, the other did not.
    WindowScaling,
    /// Urgent data on either leg.
    Urgent,
    /// The client may send segments larger than the origin leg's route carries:
    /// the program does not resize segments.
    MssTooBig,
    /// The legs did not go quiet in time (bytes unread or unacknowledged).
    NotQuiet,
    /// Reading the sockets' repair state failed.
    Repair,
    /// `SPLICES` is full or the insert failed.
    MapFull,
    /// A segment reached a socket just as the entries went in, and the entries
    /// had already translated others: the connection is reset.
    Raced,
}

impl Ineligible {
    pub const ALL: [Ineligible; 11] = [
        Ineligible::Short,
        Ineligible::MixedFamilies,
        Ineligible::Timestamps,
        Ineligible::Sack,
        Ineligible::WindowScaling,
        Ineligible::Urgent,
        Ineligible::MssTooBig,
        Ineligible::NotQuiet,
        Ineligible::Repair,
        Ineligible::MapFull,
        Ineligible::Raced,
    ];

    /// The metric label and log word.
    pub const fn label(self) -> &'static str {
        match self {
            Ineligible::Short => "short",
            Ineligible::MixedFamilies => "mixed_families",
            Ineligible::Timestamps => "timestamps_differ",
            Ineligible::Sack => "sack_differs",
            Ineligible::WindowScaling => "window_scaling_differs",
            Ineligible::Urgent => "urgent_data",
            Ineligible::MssTooBig => "mss_too_big",
            Ineligible::NotQuiet => "not_quiet",
            Ineligible::Repair => "repair_failed",
            Ineligible::MapFull => "map_full",
            Ineligible::Raced => "handoff_raced",
        }
    }
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Whether the legs can be spliced: the options both negotiated must agree, as
/// the XDP program rewrites options but never adds or removes one.
pub fn eligibility(client: &LegState, origin: &LegState) -> Result<(), Ineligible> {
    if client.local.is_ipv4() != origin.local.is_ipv4() {
        return Err(Ineligible::MixedFamilies);
    }
    if client.timestamps != origin.timestamps {
        return Err(Ineligible::Timestamps);
    }
    if client.sack != origin.sack {
        return Err(Ineligible::Sack);
    }
    if client.wscale != origin.wscale {
        return Err(Ineligible::WindowScaling);
    }
    if client.urgent || origin.urgent {
        return Err(Ineligible::Urgent);
    }
    // What the client may send must leave by the origin leg as it is. (The other
    // way is bounded at connect: the origin leg offers at most the client leg's
    // MSS.)
    if origin.path_mtu != 0 && client.advmss + headers(origin) > origin.path_mtu {
        return Err(Ineligible::MssTooBig);
    }
    Ok(())
}

/// The two `SPLICES` entries of a connection of app `app`: client → origin first.
///
/// Sequence spaces: the client's next byte (`client.rcv_nxt`) must arrive at the
/// origin as the agent's next byte on that leg (`origin.snd_nxt`), and the
/// client's acknowledgement of the agent's next byte (`client.snd_nxt`) as an
/// acknowledgement of the origin's next byte (`origin.rcv_nxt`); the other
/// direction negates both offsets.
pub fn splice_entries(
    client: &LegState,
    origin: &LegState,
    app: u32,
) -> [(SpliceKey, SpliceEntry); 2] {
    let mut flags = 0;
    if client.timestamps && origin.timestamps {
        flags |= SPLICE_TIMESTAMPS;
    }
    if client.sack && origin.sack {
        flags |= SPLICE_SACK;
    }
    let to_origin = direction(
        client,
        origin,
        flags | SPLICE_TO_ORIGIN,
        origin.snd_nxt.wrapping_sub(client.rcv_nxt),
        origin.rcv_nxt.wrapping_sub(client.snd_nxt),
        app,
    );
    let to_client = direction(
        origin,
        client,
        flags,
        client.snd_nxt.wrapping_sub(origin.rcv_nxt),
        client.rcv_nxt.wrapping_sub(origin.snd_nxt),
        app,
    );
    [to_origin, to_client]
}

/// The keys of a connection's two entries (client → origin first): the
/// 4-tuples its segments arrive with at the edge.
pub fn splice_keys(
    client: SocketAddr,
    edge: SocketAddr,
    local: SocketAddr,
    origin: SocketAddr,
) -> [SpliceKey; 2] {
    let key = |from: SocketAddr, to: SocketAddr| SpliceKey {
        src: addr16(from.ip()),
        dst: addr16(to.ip()),
        sport: from.port(),
        dport: to.port(),
    };
    [key(client, edge), key(origin, local)]
}

/// The entry that holds a connection (`SPLICE_HOLD`) while the agent brings it
/// to a quiet point: the program drops its segments with data, SYN or FIN and
/// passes the rest to the socket. Nothing else of it is read.
pub fn hold_entry() -> SpliceEntry {
    SpliceEntry {
        flags: SPLICE_HOLD,
        ..Default::default()
    }
}

/// The entry for segments arriving on leg `from` and leaving on leg `to`.
fn direction(
    from: &LegState,
    to: &LegState,
    flags: u8,
    seq_delta: u32,
    ack_delta: u32,
    app: u32,
) -> (SpliceKey, SpliceEntry) {
    let key = SpliceKey {
        src: addr16(from.peer.ip()),
        dst: addr16(from.local.ip()),
        sport: from.peer.port(),
        dport: from.local.port(),
    };
    let family = if to.local.is_ipv4() { 4 } else { 6 };
    let entry = SpliceEntry {
        src: addr16(to.local.ip()),
        dst: addr16(to.peer.ip()),
        sport: to.local.port(),
        dport: to.peer.port(),
        family,
        flags,
        wscale_in: if from.wscale { from.snd_wscale } else { 0 },
        wscale_out: if to.wscale { to.rcv_wscale } else { 0 },
        seq_delta,
        ack_delta,
        // The base the TSval offset is learnt from (see `SpliceEntry`).
        tsval_delta: to.ts_clock,
        tsecr_delta: 0,
        ifindex: to.ifindex,
        app,
        ts_learn: u8::from(flags & SPLICE_TIMESTAMPS != 0),
        ..Default::default()
    };
    (key, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(local: &str, peer: &str, snd_nxt: u32, rcv_nxt: u32) -> LegState {
        LegState {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            snd_nxt,
            rcv_nxt,
            wscale: true,
            snd_wscale: 7,
            rcv_wscale: 9,
            timestamps: true,
            sack: true,
            ts_clock: 5000,
            urgent: false,
            ifindex: 3,
            advmss: 1460,
            path_mtu: 1500,
        }
    }

    #[test]
    fn a_client_byte_lands_at_the_origin_legs_next_sequence_number() {
        let client = leg("10.0.1.1:80", "10.0.1.2:40000", 100, 0xffff_fff0);
        let origin = leg("10.0.2.1:50000", "10.0.2.2:8080", 7000, 9000);
        let [(k1, e1), (k2, e2)] = splice_entries(&client, &origin, 4);
        // The client's next byte and its acknowledgement of the agent's next byte.
        assert_eq!(0xffff_fff0u32.wrapping_add(e1.seq_delta), 7000);
        assert_eq!(100u32.wrapping_add(e1.ack_delta), 9000);
        // And back: the origin's next byte, its acknowledgement.
        assert_eq!(9000u32.wrapping_add(e2.seq_delta), 100);
        assert_eq!(7000u32.wrapping_add(e2.ack_delta), 0xffff_fff0);
        assert_eq!(k1.sport, 40000);
        assert_eq!(k1.dport, 80);
        assert_eq!((e1.sport, e1.dport), (50000, 8080));
        assert_eq!((k2.sport, k2.dport), (8080, 50000));
        assert_eq!((e2.sport, e2.dport), (80, 40000));
        assert_eq!(e1.flags, SPLICE_TIMESTAMPS | SPLICE_SACK | SPLICE_TO_ORIGIN);
        assert_eq!(e2.flags, SPLICE_TIMESTAMPS | SPLICE_SACK);
        // The client's windows come scaled by its shift, the origin reads the
        // agent's by the agent's shift on that leg.
        assert_eq!((e1.wscale_in, e1.wscale_out), (7, 9));
        assert_eq!((e1.tsval_delta, e1.ts_learn), (5000, 1));
        // The reverse entry's key is the forward entry's output, swapped.
        assert_eq!(k2.src, e1.dst);
        assert_eq!(k2.dst, e1.src);
    }

    #[test]
    fn legs_that_disagree_on_an_option_are_not_eligible() {
        let client = leg("10.0.1.1:80", "10.0.1.2:40000", 1, 1);
        let origin = leg("10.0.2.1:50000", "10.0.2.2:8080", 1, 1);
        assert_eq!(eligibility(&client, &origin), Ok(()));
        let mut o = origin;
        o.timestamps = false;
        assert_eq!(eligibility(&client, &o), Err(Ineligible::Timestamps));
        let mut o = origin;
        o.sack = false;
        assert_eq!(eligibility(&client, &o), Err(Ineligible::Sack));
        let mut o = origin;
        o.wscale = false;
        assert_eq!(eligibility(&client, &o), Err(Ineligible::WindowScaling));
        let mut o = origin;
        o.urgent = true;
        assert_eq!(eligibility(&client, &o), Err(Ineligible::Urgent));
        let o = leg("[fd00:2::1]:50000", "[fd00:2::2]:8080", 1, 1);
        assert_eq!(eligibility(&client, &o), Err(Ineligible::MixedFamilies));
    }

    #[test]
    fn what_the_client_may_send_must_fit_the_origin_legs_route() {
        let client = leg("10.0.1.1:80", "10.0.1.2:40000", 1, 1);
        let origin = leg("10.0.2.1:50000", "10.0.2.2:8080", 1, 1);
        // 1460 + 40 fits a 1500 route exactly; a 1400 route does not.
        let mut o = origin;
        o.path_mtu = 1400;
        assert_eq!(eligibility(&client, &o), Err(Ineligible::MssTooBig));
        // The edge offered the client less: fits again.
        let mut c = client;
        c.advmss = 1360;
        assert_eq!(eligibility(&c, &o), Ok(()));
        // IPv6 headers are 20 bytes longer: 1440 + 60 fits 1500, 1460 does not.
        let c6 = LegState {
            advmss: 1440,
            ..leg("[fd00:1::1]:80", "[fd00:1::2]:40000", 1, 1)
        };
        let o6 = leg("[fd00:2::1]:50000", "[fd00:2::2]:8080", 1, 1);
        assert_eq!(eligibility(&c6, &o6), Ok(()));
        let c6 = LegState { advmss: 1460, ..c6 };
        assert_eq!(eligibility(&c6, &o6), Err(Ineligible::MssTooBig));
        // An origin route whose MTU could not be read is not judged.
        let mut o = origin;
        o.path_mtu = 0;
        assert_eq!(eligibility(&client, &o), Ok(()));
    }

    #[test]
    fn without_timestamps_nothing_is_learnt() {
        let mut client = leg("10.0.1.1:80", "10.0.1.2:40000", 1, 1);
        client.timestamps = false;
        let mut origin = leg("10.0.2.1:50000", "10.0.2.2:8080", 1, 1);
        origin.timestamps = false;
        let [(_, e1), (_, e2)] = splice_entries(&client, &origin, 0);
        assert_eq!(e1.ts_learn, 0);
        assert_eq!(e2.flags & SPLICE_TIMESTAMPS, 0);
    }
}
