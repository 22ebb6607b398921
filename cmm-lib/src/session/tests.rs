//! Deterministic tests of the session: two peers in one thread, a virtual clock, and simulated
//! paths with delay, bandwidth, reordering, duplication, and silent or announced death.

use super::*;
use crate::frame::FrameDecoder;
use cmm_policy::{LabelPolicy, NetworkKind, NetworkRef, NoMatch};
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);

/// Feeding a session raw bytes, as a driver's reader does: decoded here, then handed to the
/// one entry point, frame by frame. (The simulation delivers whole frames per packet.)
trait Feed {
    fn handle_input(&mut self, id: PathId, data: &[u8], now: Instant) -> Result<(), SessionError>;
    fn handle_input_owned(&mut self, id: PathId, data: BytesMut, now: Instant) -> Result<(), SessionError>;
}

impl Feed for Session {
    fn handle_input(&mut self, id: PathId, data: &[u8], now: Instant) -> Result<(), SessionError> {
        self.handle_input_owned(id, BytesMut::from(data), now)
    }

    fn handle_input_owned(&mut self, id: PathId, data: BytesMut, now: Instant) -> Result<(), SessionError> {
        let mut d = FrameDecoder::new();
        d.push_owned(data);
        while let Some(f) = d.next_frame()? {
            self.handle_frame(id, f, now)?;
        }
        assert_eq!(d.buffered(), 0, "a packet ended inside a frame");
        Ok(())
    }
}

/// Wi-Fi: fast, far. Cell: slow, near, metered. As in the lab.
fn wifi() -> Network {
    let mut n = Network::new("wifi", "wifi0", NetworkKind::Wifi);
    n.declared.bandwidth_down = Some(50_000_000);
    n.declared.bandwidth_up = Some(50_000_000);
    n.declared.rtt = Some(Duration::from_millis(80));
    n
}

fn cell() -> Network {
    let mut n = Network::new("cell", "cell0", NetworkKind::Cellular);
    n.declared.bandwidth_down = Some(2_000_000);
    n.declared.bandwidth_up = Some(2_000_000);
    n.declared.rtt = Some(Duration::from_millis(30));
    n.metered = true;
    n
}

fn policy() -> Arc<Policy> {
    Arc::new(Policy::default())
}

/// Background may not use metered networks: with Wi-Fi gone it must wait.
fn strict_policy() -> Arc<Policy> {
    let mut p = Policy::default();
    p.label_policies.push(LabelPolicy {
        labels: Labels::BACKGROUND,
        networks: Some(vec![NetworkRef::Any]),
        metered: false,
        on_no_match: NoMatch::Defer,
        max_wait: Duration::from_secs(600),
    });
    Arc::new(p)
}

struct Packet {
    at: Instant,
    bytes: Bytes,
}

struct Link {
    /// One-way delay.
    delay: Duration,
    /// Bytes per second, both ways.
    rate: u64,
    /// Whether each direction delivers. A TCP connection over a dead network neither errs nor
    /// drops bytes from the middle of its stream: it stalls, so packets are held meanwhile and
    /// delivered, in order, if the direction comes back (its path may have been given up by
    /// then: the late bytes are duplicates).
    up_ab: bool,
    up_ba: bool,
    held_ab: Vec<Bytes>,
    held_ba: Vec<Bytes>,
    busy_ab: Instant,
    busy_ba: Instant,
    ab: Vec<Packet>,
    ba: Vec<Packet>,
    /// Extra random delay per packet: varies how paths overtake each other (within one path
    /// TCP keeps order, so packets never overtake on the same link).
    jitter: Duration,
    /// The connection is gone for good (a side closed it while its network was down, or it
    /// was reset): nothing on it or written to it later arrives.
    dead: bool,
}

struct Sim {
    now: Instant,
    a: Session,
    b: Session,
    links: BTreeMap<PathId, Link>,
    b_pending: BTreeMap<PathId, FrameDecoder>,
    seed: u64,
    /// What b has received, in order.
    got: Vec<u8>,
    got_labels: Vec<(usize, Labels)>,
    b_eof: bool,
    b_reads: bool,
    /// Streams other than 0, per side: what was read from each, and how each ended.
    b_streams: BTreeMap<StreamId, StreamLog>,
    a_streams: BTreeMap<StreamId, StreamLog>,
    /// What a has received from b, in order.
    a_got: Vec<u8>,
    a_got_labels: Vec<(usize, Labels)>,
    a_reads: bool,
}

impl Sim {
    fn new(pol: Arc<Policy>) -> Sim {
        Sim::with_config(pol, SessionConfig::default())
    }

    fn with_config(pol: Arc<Policy>, cfg: SessionConfig) -> Sim {
        let id = SessionId([9; 16]);
        Sim {
            now: Instant::now(),
            a: Session::new(Role::Connecting, id, cfg.clone(), pol.clone()),
            b: Session::new(Role::Accepting, id, cfg, pol),
            links: BTreeMap::new(),
            b_pending: BTreeMap::new(),
            seed: 1,
            got: Vec::new(),
            got_labels: Vec::new(),
            b_eof: false,
            b_reads: true,
            b_streams: BTreeMap::new(),
            a_streams: BTreeMap::new(),
            a_got: Vec::new(),
            a_got_labels: Vec::new(),
            a_reads: true,
        }
    }

    fn rand(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    fn add_path(&mut self, id: PathId, network: Network, delay: Duration, rate: u64) {
        self.links.insert(
            id,
            Link {
                delay,
                rate,
                up_ab: true,
                up_ba: true,
                held_ab: Vec::new(),
                held_ba: Vec::new(),
                busy_ab: self.now,
                busy_ba: self.now,
                ab: Vec::new(),
                ba: Vec::new(),
                jitter: Duration::ZERO,
                dead: false,
            },
        );
        self.b_pending.insert(id, FrameDecoder::new());
        self.a.add_path(id, network, self.now);
    }

    /// Moves what both sides want to send onto the links — as the driver does, only while a
    /// link has less than about 50 ms of bytes queued (the socket's low-water mark).
    fn transmit(&mut self) {
        const QUEUE: Duration = Duration::from_millis(50);
        let ids: Vec<PathId> = self.links.keys().copied().collect();
        for id in ids {
            while self.links[&id].busy_ab <= self.now + QUEUE {
                let Some(t) = self.a.poll_transmit(id, self.now) else { break };
                self.push(id, true, t);
            }
            while self.links[&id].busy_ba <= self.now + QUEUE {
                let Some(t) = self.b.poll_transmit(id, self.now) else { break };
                self.push(id, false, t);
            }
        }
    }

    fn push(&mut self, id: PathId, ab: bool, t: Transmit) {
        let mut bytes = BytesMut::from(&t.header[..]);
        bytes.extend_from_slice(&t.payload);
        let jitter_ns = {
            let j = self.links[&id].jitter.as_nanos() as u64;
            if j == 0 { 0 } else { self.rand() % j }
        };
        let now = self.now;
        let link = self.links.get_mut(&id).unwrap();
        if link.dead {
            return;
        }
        let (up, busy, queue, held) = if ab {
            (link.up_ab, &mut link.busy_ab, &mut link.ab, &mut link.held_ab)
        } else {
            (link.up_ba, &mut link.busy_ba, &mut link.ba, &mut link.held_ba)
        };
        if !up {
            held.push(bytes.freeze());
            return;
        }
        // A direction that came back delivers what it held first: one TCP stream, in order.
        for b in held.drain(..) {
            let floor = queue.last().map_or(now, |p| p.at);
            queue.push(Packet { at: floor.max(now), bytes: b });
        }
        let tx = Duration::from_nanos(bytes.len() as u64 * 1_000_000_000 / link.rate);
        *busy = (*busy).max(now) + tx;
        // TCP keeps order within a path: never deliver before the previous packet.
        let floor = queue.last().map_or(now, |p| p.at);
        let at = (*busy + link.delay + Duration::from_nanos(jitter_ns)).max(floor);
        queue.push(Packet { at, bytes: bytes.freeze() });
    }

    fn deliver(&mut self) {
        let ids: Vec<PathId> = self.links.keys().copied().collect();
        for id in ids {
            let now = self.now;
            let link = self.links.get_mut(&id).unwrap();
            if link.dead {
                continue;
            }
            // A direction that came back releases what it held, in order.
            let floor_ab = link.ab.last().map_or(now, |p| p.at);
            if link.up_ab {
                for bytes in link.held_ab.drain(..) {
                    link.ab.push(Packet { at: floor_ab.max(now), bytes });
                }
            }
            let floor_ba = link.ba.last().map_or(now, |p| p.at);
            if link.up_ba {
                for bytes in link.held_ba.drain(..) {
                    link.ba.push(Packet { at: floor_ba.max(now), bytes });
                }
            }
            let due_ab: Vec<Packet> = drain_due(&mut link.ab, now);
            let due_ba: Vec<Packet> = drain_due(&mut link.ba, now);
            for p in due_ab {
                self.deliver_to_b(id, &p.bytes);
            }
            for p in due_ba {
                if let Err(e) = self.a.handle_input(id, &p.bytes, now) {
                    panic!("a rejected input on path {id}: {e}");
                }
            }
        }
    }

    fn deliver_to_b(&mut self, id: PathId, bytes: &[u8]) {
        if let Some(dec) = self.b_pending.get_mut(&id) {
            dec.push(bytes);
            match read_hello(dec).expect("hello") {
                None => return,
                Some(Hello { session, path, network: info, .. }) => {
                    assert_eq!(session, self.a.id());
                    assert_eq!(path, id);
                    let rest = dec.take_buffered();
                    self.b_pending.remove(&id);
                    self.b.add_path(id, network_from_info(&info, id), self.now);
                    if let Err(e) = self.b.handle_input(id, &rest, self.now) {
                        panic!("b rejected input: {e}");
                    }
                }
            }
            return;
        }
        if let Err(e) = self.b.handle_input(id, bytes, self.now) {
            panic!("b rejected input on path {id}: {e}");
        }
    }

    /// Kills path `id`'s connection: what is in flight on it is lost, and nothing more gets
    /// through. Neither side is told.
    fn kill(&mut self, id: PathId) {
        if let Some(l) = self.links.get_mut(&id) {
            l.dead = true;
            l.ab.clear();
            l.ba.clear();
            l.held_ab.clear();
            l.held_ba.clear();
        }
    }

    /// Every network of the connecting side goes at once (admin down): its connections die
    /// with what is in flight, it drops all its paths, and the accepting side, which nobody
    /// can tell, still believes in its own.
    fn total_outage(&mut self) {
        let ids: Vec<PathId> = self.links.keys().copied().collect();
        for id in ids {
            self.kill(id);
            self.a.remove_path(id, "network went down", self.now);
        }
    }

    /// Reads every stream other than 0 that its log says to read, accepting new ones first.
    fn read_streams(s: &mut Session, logs: &mut BTreeMap<StreamId, StreamLog>) {
        while let Some(id) = s.accept_stream() {
            logs.entry(id).or_default();
        }
        let mut buf = vec![0u8; 100_000];
        for (&id, log) in logs.iter_mut() {
            while log.reads && log.end.is_none() {
                match s.recv_on(id, &mut buf) {
                    Ok((0, _)) => log.end = Some(Ok(())),
                    Ok((n, _)) => log.bytes.extend_from_slice(&buf[..n]),
                    Err(RecvError::WouldBlock) => break,
                    Err(e) => log.end = Some(Err(e)),
                }
            }
        }
    }

    fn read_a(&mut self) {
        Sim::read_streams(&mut self.a, &mut self.a_streams);
        Sim::read_streams(&mut self.b, &mut self.b_streams);
        if !self.a_reads {
            return;
        }
        let mut buf = vec![0u8; 100_000];
        while let Ok((n, l)) = self.a.recv(&mut buf) {
            if n == 0 {
                break;
            }
            self.a_got.extend_from_slice(&buf[..n]);
            match self.a_got_labels.last_mut() {
                Some((len, last)) if *last == l => *len += n,
                _ => self.a_got_labels.push((n, l)),
            }
        }
    }

    fn read_b(&mut self) {
        if !self.b_reads {
            return;
        }
        let mut buf = vec![0u8; 100_000];
        loop {
            match self.b.recv(&mut buf) {
                Ok((0, _)) => {
                    self.b_eof = true;
                    break;
                }
                Ok((n, l)) => {
                    self.got.extend_from_slice(&buf[..n]);
                    match self.got_labels.last_mut() {
                        Some((len, last)) if *last == l => *len += n,
                        _ => self.got_labels.push((n, l)),
                    }
                }
                Err(_) => break,
            }
        }
    }

    /// One round: transmit, deliver what is due, read, fire timers; then advance the clock to
    /// the next thing that happens.
    fn step(&mut self) -> bool {
        self.transmit();
        self.deliver();
        self.read_b();
        self.read_a();
        if self.a.poll_timeout().is_some_and(|t| t <= self.now) {
            self.a.handle_timeout(self.now);
        }
        if self.b.poll_timeout().is_some_and(|t| t <= self.now) {
            self.b.handle_timeout(self.now);
        }
        self.transmit();
        let mut next: Option<Instant> = None;
        for l in self.links.values() {
            for p in l.ab.iter().chain(l.ba.iter()) {
                next = Some(next.map_or(p.at, |n| n.min(p.at)));
            }
            // A link with room again may take more.
            for busy in [l.busy_ab, l.busy_ba] {
                let free = busy.checked_sub(Duration::from_millis(50)).unwrap_or(busy);
                if free > self.now {
                    next = Some(next.map_or(free, |n| n.min(free)));
                }
            }
        }
        for t in [self.a.poll_timeout(), self.b.poll_timeout()].into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        match next {
            Some(t) if t > self.now => {
                self.now = t;
                true
            }
            Some(_) => true,
            None => false,
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        let mut stuck = 0;
        while self.now < end {
            let before = self.now;
            if !self.step() {
                self.now = end;
            }
            stuck = if self.now == before { stuck + 1 } else { 0 };
            assert!(
                stuck < 100_000,
                "no progress at {:?}:\na: {}\nb: {}",
                self.now,
                self.a.debug_summary(),
                self.b.debug_summary()
            );
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Sim) -> bool) {
        let end = self.now + limit;
        let mut stuck = 0;
        while !done(self) {
            assert!(self.now < end, "not done within {limit:?} (virtual)");
            let before = self.now;
            if !self.step() {
                self.now += MS;
            }
            stuck = if self.now == before { stuck + 1 } else { 0 };
            assert!(
                stuck < 100_000,
                "no progress at {:?}:\na: {}\nb: {}",
                self.now,
                self.a.debug_summary(),
                self.b.debug_summary()
            );
        }
    }

    /// Sends everything, feeding the send buffer as it drains.
    fn send_all(&mut self, data: &[u8], labels: Labels, limit: Duration) {
        let mut off = 0;
        let end = self.now + limit;
        while off < data.len() {
            match self.a.send(&data[off..], labels) {
                Ok(n) => off += n,
                Err(SendError::Full) | Err(SendError::NoNetwork) => {
                    assert!(self.now < end, "send stuck at {off}");
                    if !self.step() {
                        self.now += MS;
                    }
                }
                Err(e) => panic!("send: {e}"),
            }
        }
    }
}

fn drain_due(q: &mut Vec<Packet>, now: Instant) -> Vec<Packet> {
    let mut due = Vec::new();
    let mut keep = Vec::new();
    for p in q.drain(..) {
        if p.at <= now { due.push(p) } else { keep.push(p) }
    }
    *q = keep;
    due
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed).wrapping_add((i >> 8) as u8)).collect()
}

fn path_bytes(s: &Session, name: &str) -> u64 {
    s.path_stats().iter().filter(|p| p.network.name == name).map(|p| p.bytes_sent).sum()
}

#[test]
fn one_path_carries_a_stream_in_order() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    let data = payload(3_000_000, 1);
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(60));
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len() && s.a.all_acked());
    assert_eq!(sim.got, data);
    assert_eq!(sim.got_labels, vec![(data.len(), Labels::BACKGROUND)]);
}

#[test]
fn labels_choose_paths_and_reads_keep_label_runs() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_stats().iter().all(|p| p.established));
    let bg = payload(400_000, 2);
    let fg = payload(4_000, 3);
    sim.send_all(&bg, Labels::BACKGROUND, Duration::from_secs(10));
    sim.send_all(&fg, Labels::ONDEMAND, Duration::from_secs(10));
    let total = bg.len() + fg.len();
    sim.run_until(Duration::from_secs(30), |s| s.got.len() == total);
    assert_eq!(&sim.got[..bg.len()], &bg[..]);
    assert_eq!(&sim.got[bg.len()..], &fg[..]);
    assert_eq!(sim.got_labels, vec![(bg.len(), Labels::BACKGROUND), (fg.len(), Labels::ONDEMAND)]);
    // Background went over Wi-Fi (bandwidth), on-demand over cell (RTT).
    assert_eq!(path_bytes(&sim.a, "wifi"), bg.len() as u64);
    assert_eq!(path_bytes(&sim.a, "cell"), fg.len() as u64);
    // The accepting side received on the same paths.
    let rx: u64 =
        sim.b.path_stats().iter().filter(|p| p.network.name == "cell").map(|p| p.bytes_received).sum();
    assert_eq!(rx, fg.len() as u64);
}

#[test]
fn a_path_that_goes_down_has_its_data_resent_elsewhere() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    let data = payload(600_000, 4);
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_for(30 * MS);
    // Wi-Fi is taken down: the driver closes the path; what was on it moves to cell at once.
    sim.links.get_mut(&1).unwrap().up_ab = false;
    sim.links.get_mut(&1).unwrap().up_ba = false;
    let t0 = sim.now;
    sim.a.remove_path(1, "network went down", sim.now);
    sim.run_until(Duration::from_secs(5), |s| path_bytes(&s.a, "cell") > 0);
    assert!(sim.now - t0 < 100 * MS, "resend started after {:?}", sim.now - t0);
    // The peer learns on cell (PATH_DOWN) without waiting for a timeout.
    sim.run_until(Duration::from_secs(1), |s| s.b.path_ids() == vec![2]);
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data, "every byte once, in order");
    let events: Vec<Event> = std::iter::from_fn(|| sim.a.poll_event()).collect();
    assert!(events.iter().any(|e| matches!(e, Event::PathDown { path: 1, .. })));
}

/// Cellular as a relay sees it after a failover: slow and far (the lab's 2 Mbit/s with 60 ms
/// each way), so one 64 KiB chunk takes longer to send than three idle round trips.
fn far_cell() -> Network {
    let mut n = cell();
    n.declared.rtt = Some(Duration::from_millis(120));
    n
}

#[test]
fn a_backlog_moved_to_a_slow_path_arrives_soon_in_pieces_and_is_sent_there_once() {
    // The relay's case: b (the relay) sends a download; a (the proxy) loses Wi-Fi, knows it
    // first and tells b on cellular.
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, far_cell(), 60 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2 && s.b.path_ids().len() == 2);
    // Idle cellular: its round trip is known, nothing is queued there.
    sim.run_for(Duration::from_secs(2));
    let data = payload(1_000_000, 8);
    let mut off = 0;
    while off < data.len() {
        off += sim.b_send_now(&data[off..], Labels::BACKGROUND);
        sim.run_for(MS);
    }
    sim.run_for(50 * MS);
    assert!(sim.a_got.len() < data.len() / 2, "the backlog must still be on Wi-Fi");
    // Wi-Fi goes, with what was on the wire.
    sim.kill(1);
    sim.a.remove_path(1, "network went down", sim.now);
    let (t0, had) = (sim.now, sim.a_got.len());
    sim.run_until(Duration::from_secs(5), |s| s.a_got.len() > had);
    // The first missing bytes come after the news (60 ms), one piece at 2 Mbit/s and the way
    // back (60 ms): not after a whole 64 KiB chunk (262 ms), nor after what a already had.
    let first = sim.now - t0;
    assert!(first < 200 * MS, "the first resent bytes arrived after {first:?}");
    sim.run_until(Duration::from_secs(60), |s| s.a_got.len() == data.len());
    assert_eq!(sim.a_got, data, "every byte once, in order");
    // The slow path was never taken for dead, so nothing went on it twice.
    let events: Vec<Event> = std::iter::from_fn(|| sim.b.poll_event()).collect();
    assert!(!events.iter().any(|e| matches!(e, Event::PathTroubled { .. })), "{events:?}");
    let cell = path_bytes(&sim.b, "cell");
    assert!(
        cell <= (data.len() - had) as u64 + 64 * 1024,
        "cell carried {cell}, a lacked {}",
        data.len() - had
    );
}

#[test]
fn what_a_slow_path_has_in_flight_is_copied_to_a_fast_one_that_returns() {
    // b (the relay) sends over cellular alone, far away; Wi-Fi comes back as a new path.
    let mut sim = Sim::new(policy());
    sim.add_path(2, far_cell(), 300 * MS, 250_000);
    sim.run_until(Duration::from_secs(2), |s| s.established() == 1 && s.b.path_ids().len() == 1);
    let data = payload(200_000, 10);
    let n = sim.b_send_now(&data, Labels::BACKGROUND);
    assert_eq!(n, data.len());
    sim.run_for(50 * MS);
    sim.add_path(3, wifi(), 10 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(2), |s| s.b.path_ids().len() == 2);
    let t0 = sim.now;
    sim.run_until(Duration::from_secs(30), |s| s.a_got.len() == data.len());
    assert_eq!(sim.a_got, data);
    // What cellular still had on its way (300 ms from there) came over Wi-Fi instead.
    let took = sim.now - t0;
    assert!(took < 150 * MS, "the last bytes arrived {took:?} after Wi-Fi was back");
}

#[test]
fn ondemand_on_another_stream_never_waits_behind_a_background_backlog_moved_to_cell() {
    // b (the relay) sends a background download over Wi-Fi; Wi-Fi goes and its backlog moves
    // to cellular (seconds of it at 2 Mbit/s); a person's request on another stream follows.
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, far_cell(), 60 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2 && s.b.path_ids().len() == 2);
    sim.run_for(Duration::from_secs(1));
    let bulk = payload(1_000_000, 11);
    let mut off = 0;
    while off < bulk.len() {
        off += sim.b_send_now(&bulk[off..], Labels::BACKGROUND);
        sim.run_for(MS);
    }
    sim.kill(1);
    sim.a.remove_path(1, "network went down", sim.now);
    sim.run_for(200 * MS);
    let id = sim.b.open_stream().unwrap();
    let answer = payload(4096, 12);
    assert_eq!(sim.b.send_on(id, &answer, Labels::ONDEMAND).unwrap(), answer.len());
    let t0 = sim.now;
    sim.run_until(Duration::from_secs(30), |s| {
        s.a_streams.get(&id).is_some_and(|l| l.bytes.len() == answer.len())
    });
    let took = sim.now - t0;
    assert!(took < 400 * MS, "the ONDEMAND answer took {took:?} behind the background backlog");
    sim.run_until(Duration::from_secs(60), |s| s.a_got.len() == bulk.len());
    assert_eq!(sim.a_got, bulk);
}

#[test]
fn the_accepting_side_keeps_labels_off_networks_the_connecting_sides_policy_refuses() {
    // a (the proxy) keeps background off metered cellular; b (the relay) has no such policy
    // of its own, and learns it from a's HELLO.
    let mut sim = Sim::new(strict_policy());
    sim.b = Session::new(Role::Accepting, sim.a.id(), SessionConfig::default(), policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2 && s.b.path_ids().len() == 2);
    let data = payload(300_000, 13);
    let n = sim.b_send_now(&data, Labels::BACKGROUND);
    sim.run_for(10 * MS);
    sim.kill(1);
    sim.a.remove_path(1, "network went down", sim.now);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(path_bytes(&sim.b, "cell"), 0, "background went over the metered cell");
    assert!(sim.a_got.len() < n);
    // ONDEMAND is not refused there.
    let id = sim.b.open_stream().unwrap();
    sim.b.send_on(id, b"answer", Labels::ONDEMAND).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.a_streams.get(&id).is_some_and(|l| l.bytes == b"answer"));
    // Wi-Fi returns: the background waited, nothing lost.
    sim.add_path(3, wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(30), |s| s.a_got.len() == n);
    assert_eq!(sim.a_got, data[..n]);
}

#[test]
fn background_waiting_for_wifi_never_takes_the_room_a_request_needs() {
    // Background may not use metered cellular: when Wi-Fi goes, what it had accepted waits,
    // counting against the session window; a person's request must still get through.
    let mut sim = Sim::new(strict_policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2 && s.b.path_ids().len() == 2);
    // Background streams take all they may (each its stream window) until the session has
    // no room left for them.
    let bulk = payload(4_000_000, 14);
    let mut taken = 0;
    for _ in 0..64 {
        let s = sim.a.open_stream().unwrap();
        match sim.a.send_on(s, &bulk, Labels::BACKGROUND) {
            Ok(k) => taken += k,
            Err(_) => break,
        }
    }
    assert!(taken > 0);
    sim.kill(1);
    sim.a.remove_path(1, "network went down", sim.now);
    let id = sim.a.open_stream().unwrap();
    let request = payload(4096, 15);
    assert_eq!(sim.a.send_on(id, &request, Labels::ONDEMAND), Ok(request.len()), "{}", sim.a.debug_summary());
    let t0 = sim.now;
    sim.run_until(Duration::from_secs(5), |s| s.b_streams.get(&id).is_some_and(|l| l.bytes == request));
    assert!(sim.now - t0 < 500 * MS, "the request took {:?}", sim.now - t0);
}

#[test]
fn a_lone_troubled_path_keeps_its_data_and_sends_it_once() {
    let mut sim = Sim::new(policy());
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 1);
    let data = payload(300_000, 9);
    sim.send_all(&data, Labels::ONDEMAND, Duration::from_secs(10));
    sim.run_for(20 * MS);
    // Cellular stalls for a while (nothing is lost: one TCP connection), then comes back.
    let link = sim.links.get_mut(&2).unwrap();
    link.up_ab = false;
    link.up_ba = false;
    link.held_ab.extend(link.ab.drain(..).map(|p| p.bytes));
    link.held_ba.extend(link.ba.drain(..).map(|p| p.bytes));
    sim.run_until(Duration::from_secs(10), |s| s.a.path_stats().iter().any(|p| p.troubled));
    sim.run_for(Duration::from_secs(2));
    let link = sim.links.get_mut(&2).unwrap();
    link.up_ab = true;
    link.up_ba = true;
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data);
    // Nothing better existed for it, so nothing was taken off it and sent there again.
    assert_eq!(path_bytes(&sim.a, "cell"), data.len() as u64);
}

#[test]
fn a_silently_dead_path_is_found_by_missing_acks() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    let data = payload(200_000, 5);
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_for(20 * MS);
    // Wi-Fi stops delivering anything, and nobody says so: what is on the wire stalls.
    let link = sim.links.get_mut(&1).unwrap();
    link.up_ab = false;
    link.up_ba = false;
    link.held_ab.extend(link.ab.drain(..).map(|p| p.bytes));
    link.held_ba.extend(link.ba.drain(..).map(|p| p.bytes));
    let t0 = sim.now;
    sim.run_until(Duration::from_secs(10), |s| s.a.path_stats().iter().any(|p| p.troubled));
    let detected = sim.now - t0;
    assert!(detected < Duration::from_secs(1), "silent loss found after {detected:?}");
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data);
    // New data avoids the troubled path.
    assert_eq!(sim.a.path_for(Labels::BACKGROUND), Some(2), "{}", sim.a.debug_summary());

    // Wi-Fi comes back: the late copies arrive as duplicates and are ignored; the path recovers.
    let link = sim.links.get_mut(&1).unwrap();
    link.up_ab = true;
    link.up_ba = true;
    sim.run_until(Duration::from_secs(5), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    let more = payload(50_000, 6);
    sim.send_all(&more, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_until(Duration::from_secs(30), |s| s.got.len() == data.len() + more.len());
    assert_eq!(&sim.got[data.len()..], &more[..]);
}

#[test]
fn data_whose_labels_forbid_every_remaining_path_waits_for_one() {
    let mut sim = Sim::new(strict_policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    let data = payload(300_000, 7);
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_for(10 * MS);
    sim.links.get_mut(&1).unwrap().up_ab = false;
    sim.a.remove_path(1, "down", sim.now);
    sim.run_for(Duration::from_secs(3));
    // Nothing went over the metered cell, and nothing was lost: it waits.
    assert_eq!(path_bytes(&sim.a, "cell"), 0);
    assert!(sim.got.len() < data.len());
    assert_eq!(sim.a.send(b"x", Labels::BACKGROUND), Err(SendError::NoNetwork));
    // Wi-Fi returns as a new path; everything arrives once.
    sim.add_path(3, wifi(), 40 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data);
}

#[test]
fn a_stream_opened_above_a_gap_only_a_lost_path_can_fill_is_readable_and_announced() {
    // Background (kept off metered cell) was in flight on Wi-Fi when it went: its sequence
    // numbers stay missing at b until Wi-Fi returns. A stream a opens meanwhile on cell must
    // be accepted and read at once, and `arrivals` (what wakes b's waiting application
    // calls) must grow although the session's in-order point does not move.
    let mut sim = Sim::new(strict_policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    sim.b_reads = false;
    let bulk = payload(300_000, 13);
    sim.send_all(&bulk, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_for(10 * MS);
    sim.kill(1);
    sim.a.remove_path(1, "network went down", sim.now);
    sim.run_for(500 * MS);
    let (arrivals, in_order) = (sim.b.arrivals(), sim.b.received.cumulative());
    let id = sim.a.open_stream().unwrap();
    let request = payload(4096, 14);
    assert_eq!(sim.a.send_on(id, &request, Labels::ONDEMAND), Ok(request.len()));
    sim.run_until(Duration::from_secs(5), |s| {
        s.b_streams.get(&id).is_some_and(|l| l.bytes.len() == request.len())
    });
    assert_eq!(sim.b_streams[&id].bytes, request);
    assert_eq!(sim.b.received.cumulative(), in_order, "the gap is still there");
    assert!(sim.b.arrivals() > arrivals, "b's waiters would not be woken for the new stream");
    // Wi-Fi returns: the gap fills, everything once.
    sim.b_reads = true;
    sim.add_path(3, wifi(), 40 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == bulk.len());
    assert_eq!(sim.got, bulk);
}

#[test]
fn a_backlog_on_a_slow_path_moves_when_a_fast_one_returns() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 15 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_stats().iter().all(|p| p.established));
    // Wi-Fi goes: background falls back to cell (allowed here) and 2 MB queue up there, which
    // would take 8 s at 2 Mbit/s.
    sim.links.remove(&1);
    sim.a.remove_path(1, "down", sim.now);
    let data = payload(2_000_000, 11);
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_for(Duration::from_millis(500));
    // Wi-Fi returns: what cell has not written yet moves over.
    sim.add_path(3, wifi(), 40 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(5), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data);
    let on_cell = path_bytes(&sim.a, "cell");
    assert!(on_cell < 500_000, "cell carried {on_cell} bytes: the backlog did not move");
}

#[test]
fn reordering_across_paths_and_duplicates_deliver_once_in_order() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 40 * MS, 6_250_000);
    sim.add_path(2, cell(), 5 * MS, 6_250_000);
    for l in sim.links.values_mut() {
        l.jitter = 30 * MS;
    }
    sim.run_until(Duration::from_secs(1), |s| s.a.path_stats().iter().all(|p| p.established));
    let mut expected = Vec::new();
    let send_round = |sim: &mut Sim, expected: &mut Vec<u8>, rounds: usize| {
        for i in 0..rounds {
            let chunk = payload(20_000 + i * 1000, (expected.len() + i) as u8);
            let labels = if i % 2 == 0 { Labels::BACKGROUND } else { Labels::SMALL };
            sim.send_all(&chunk, labels, Duration::from_secs(10));
            expected.extend_from_slice(&chunk);
            sim.run_for(3 * MS);
        }
    };
    // Interleaved labels: later bytes on the near path overtake earlier ones on the far path.
    send_round(&mut sim, &mut expected, 20);
    // A delay spike on Wi-Fi: it looks dead, its data is resent on cell, then the originals
    // arrive too — duplicates, which must come out once.
    sim.links.get_mut(&1).unwrap().delay = Duration::from_secs(2);
    send_round(&mut sim, &mut expected, 20);
    sim.run_until(Duration::from_secs(60), |s| s.got.len() >= expected.len());
    sim.links.get_mut(&1).unwrap().delay = 40 * MS;
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.got, expected);
    let received: u64 = sim.b.path_stats().iter().map(|p| p.bytes_received).sum();
    assert!(received > expected.len() as u64, "no duplicates happened: {received}");
}

#[test]
fn flow_control_holds_the_sender_while_the_reader_sleeps() {
    let cfg = SessionConfig { send_buffer: 4 << 20, recv_window: 1 << 20, ..SessionConfig::default() };
    let mut sim = Sim::with_config(policy(), cfg);
    sim.add_path(1, wifi(), 5 * MS, 50_000_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    sim.b_reads = false;
    let data = payload(3 << 20, 8);
    let mut off = 0;
    for _ in 0..2000 {
        match sim.a.send(&data[off..], Labels::NONE) {
            Ok(n) => off += n,
            Err(SendError::Full) => {}
            Err(e) => panic!("{e}"),
        }
        sim.step();
    }
    // The receiver holds at most its window; the sender takes no more than that.
    let held_by_b: u64 = sim.b.path_stats().iter().map(|p| p.bytes_received).sum();
    assert!(held_by_b <= (1 << 20) + frame::MAX_CHUNK as u64, "receiver took {held_by_b}");
    assert!(off < data.len());
    assert_eq!(sim.a.send(&data[off..], Labels::NONE), Err(SendError::Full));
    sim.b_reads = true;
    sim.send_all(&data[off..], Labels::NONE, Duration::from_secs(60));
    sim.run_until(Duration::from_secs(60), |s| s.got.len() == data.len());
    assert_eq!(sim.got, data);
}

#[test]
fn shutdown_ends_the_stream_after_the_data() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 10 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    sim.send_all(b"last words", Labels::NONE, Duration::from_secs(1));
    sim.a.shutdown();
    assert_eq!(sim.a.send(b"more", Labels::NONE), Err(SendError::Shutdown));
    sim.run_until(Duration::from_secs(5), |s| s.b_eof && s.a.all_acked());
    assert_eq!(sim.got, b"last words");
    // The FIN survives the loss of the path it went on.
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 10 * MS, 6_250_000);
    sim.add_path(2, cell(), 10 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::BACKGROUND) == Some(1));
    sim.send_all(b"abc", Labels::BACKGROUND, Duration::from_secs(1));
    sim.a.shutdown();
    sim.transmit();
    // The path dies with the FIN on it; its connection is gone, so nothing on it arrives.
    sim.links.remove(&1);
    sim.a.remove_path(1, "down", sim.now);
    sim.run_until(Duration::from_secs(5), |s| s.b_eof && s.a.all_acked());
    assert_eq!(sim.got, b"abc");
}

#[test]
fn bad_input_is_an_error_for_that_path_only() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 10 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    let now = sim.now;
    assert!(matches!(sim.b.handle_input(1, &[42, 0, 0, 0, 0], now), Err(SessionError::Frame(_))));
    // DATA far beyond the window.
    let mut out = BytesMut::new();
    Frame::Data {
        seq: 0,
        stream: 0,
        offset: 1 << 40,
        labels: Labels::NONE,
        fin: false,
        data: Bytes::from_static(b"x"),
    }
    .encode(&mut out);
    let mut fresh = Session::new(Role::Accepting, SessionId([1; 16]), SessionConfig::default(), policy());
    fresh.add_path(5, wifi(), now);
    assert!(matches!(fresh.handle_input(5, &out, now), Err(SessionError::Protocol(_))));
    // A second HELLO on an open path.
    let mut out = BytesMut::new();
    Frame::Hello {
        version: frame::VERSION,
        session: SessionId([1; 16]),
        path: 5,
        join: false,
        proof: [0; 32],
        network: info_from_network(&wifi(), &Policy::default()),
    }
    .encode(&mut out);
    assert!(matches!(fresh.handle_input(5, &out, now), Err(SessionError::Protocol(_))));
    // WELCOME to the accepting side.
    let mut out = BytesMut::new();
    Frame::Welcome { version: 1, session: SessionId([1; 16]), path: 5, secret: [0; 32] }.encode(&mut out);
    assert!(fresh.handle_input(5, &out, now).is_err());
    // A version we do not speak.
    let mut d = FrameDecoder::new();
    let mut out = BytesMut::new();
    Frame::Hello {
        version: 1,
        session: SessionId([1; 16]),
        path: 5,
        join: false,
        proof: [0; 32],
        network: info_from_network(&wifi(), &Policy::default()),
    }
    .encode(&mut out);
    d.push(&out);
    assert!(read_hello(&mut d).unwrap_err().to_string().contains("version 1 is not supported"));
}

#[derive(Clone, Debug)]
enum Op {
    Send(usize, u8),
    Run(u16),
    Vanish(PathId),
    Revive(PathId),
    Remove(PathId),
    Add(PathId),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (1usize..50_000, 0u8..4).prop_map(|(n, l)| Op::Send(n, l)),
            4 => (1u16..400).prop_map(Op::Run),
            1 => (1u32..4).prop_map(Op::Vanish),
            1 => (1u32..4).prop_map(Op::Revive),
            1 => (1u32..4).prop_map(Op::Remove),
            1 => (1u32..4).prop_map(Op::Add),
        ],
        1..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever happens to the paths, the receiver gets exactly the bytes sent, in order, once,
    /// with their labels — as long as some path is left in the end.
    #[test]
    fn any_path_history_delivers_exactly_the_stream(ops in ops()) {
        run_ops(ops);
    }
}

/// Runs a history of sends and path events; the receiver must get exactly the stream.
fn run_ops(ops: Vec<Op>) {
    let mut sim = Sim::new(policy());
    let nets = |id: PathId| if id % 2 == 1 { wifi() } else { cell() };
    let mut next_id = 10;
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 10 * MS, 1_000_000);
    let mut expected = Vec::new();
    let mut labels_expected: Vec<(usize, Labels)> = Vec::new();
    for op in ops {
        match op {
            Op::Send(n, l) => {
                let labels = [Labels::NONE, Labels::ONDEMAND, Labels::BACKGROUND, Labels::SMALL][l as usize];
                let data = payload(n, expected.len() as u8);
                let mut off = 0;
                for _ in 0..200 {
                    match sim.a.send(&data[off..], labels) {
                        Ok(k) => off += k,
                        Err(_) => {
                            sim.step();
                        }
                    }
                    if off == data.len() {
                        break;
                    }
                }
                expected.extend_from_slice(&data[..off]);
                if off > 0 {
                    match labels_expected.last_mut() {
                        Some((len, last)) if *last == labels => *len += off,
                        _ => labels_expected.push((off, labels)),
                    }
                }
            }
            Op::Run(ms) => sim.run_for(Duration::from_millis(ms as u64)),
            Op::Vanish(i) | Op::Revive(i) | Op::Remove(i) => {
                let ids: Vec<PathId> = sim.links.keys().copied().collect();
                if ids.len() <= 1 {
                    continue;
                }
                let id = ids[i as usize % ids.len()];
                let link = sim.links.get_mut(&id).unwrap();
                match op {
                    Op::Vanish(_) => {
                        link.up_ab = false;
                        link.up_ba = false;
                    }
                    Op::Revive(_) => {
                        link.up_ab = true;
                        link.up_ba = true;
                    }
                    _ => {
                        sim.links.remove(&id);
                        sim.a.remove_path(id, "removed", sim.now);
                        sim.b.remove_path(id, "removed", sim.now);
                    }
                }
            }
            Op::Add(i) => {
                next_id += 1;
                sim.add_path(next_id, nets(i), 15 * MS, 2_000_000);
            }
        }
    }
    // Heal: every remaining link delivers; one fresh path of each kind.
    for l in sim.links.values_mut() {
        l.up_ab = true;
        l.up_ba = true;
    }
    sim.add_path(100, wifi(), 20 * MS, 6_250_000);
    sim.add_path(101, cell(), 10 * MS, 1_000_000);
    let want = expected.len();
    sim.run_until(Duration::from_secs(600), |s| s.got.len() >= want && s.a.all_acked());
    assert_eq!(&sim.got, &expected);
    assert_eq!(&sim.got_labels, &labels_expected);
}

#[test]
fn vanished_path_revived_after_another_was_removed() {
    // Found by the property test: a path whose HELLO stalled, revived after another path was
    // removed on both sides.
    run_ops(vec![
        Op::Run(1),
        Op::Vanish(2),
        Op::Send(1, 0),
        Op::Add(1),
        Op::Revive(3),
        Op::Remove(1),
        Op::Send(1, 0),
    ]);
}

/// Wi-Fi whose declared upload rate (8 Mbit/s) is below the simulated link's, so pacing shows.
fn slow_declared_wifi() -> Network {
    let mut n = wifi();
    n.declared.bandwidth_up = Some(8_000_000);
    n
}

/// Sends `len` background bytes; returns how long until the peer has them all. Then shuts
/// down: paced data never holds up the end of the stream.
fn background_transfer(sim: &mut Sim, len: usize) -> Duration {
    let data = payload(len, 7);
    let t0 = sim.now;
    sim.send_all(&data, Labels::BACKGROUND, Duration::from_secs(30));
    sim.run_until(Duration::from_secs(30), |s| s.got.len() == data.len());
    let took = sim.now - t0;
    assert_eq!(sim.got, data);
    sim.a.shutdown();
    sim.run_until(Duration::from_secs(30), |s| s.b_eof && s.a.all_acked());
    took
}

#[test]
fn background_is_paced_only_while_foreground_is_active_on_its_network() {
    // No foreground traffic: full speed (2 MB at 6.25 MB/s).
    let mut sim = Sim::new(policy());
    sim.add_path(1, slow_declared_wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    let fast = background_transfer(&mut sim, 2_000_000);
    assert!(fast < Duration::from_millis(700), "{fast:?}");

    // Foreground traffic on the network (another connection's, through the shared trickler):
    // background is kept to 0.9 of the declared 1 MB/s.
    let mut sim = Sim::new(policy());
    let trickler = Arc::new(Trickler::new());
    sim.a.set_trickler(trickler.clone());
    sim.add_path(1, slow_declared_wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    trickler.foreground("wifi0", sim.now);
    let paced = background_transfer(&mut sim, 2_000_000);
    let expected = 2_000_000.0 / 900_000.0;
    assert!(
        (paced.as_secs_f64() - expected).abs() < 0.15 * expected,
        "2 MB took {paced:?}, expected about {expected:.2} s"
    );
}

#[test]
fn foreground_chunks_sent_or_received_start_pacing_on_both_sides() {
    let mut sim = Sim::new(policy());
    sim.add_path(1, slow_declared_wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    let b_network = |sim: &Sim| sim.b.paths[&1].network.clone();
    assert!(!sim.a.trickler.pacing(&slow_declared_wifi(), sim.now));
    assert!(!sim.b.trickler.pacing(&b_network(&sim), sim.now));
    sim.send_all(b"a person is waiting", Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(1), |s| s.got.len() == 19);
    assert!(sim.a.trickler.pacing(&slow_declared_wifi(), sim.now));
    assert!(sim.b.trickler.pacing(&b_network(&sim), sim.now));
    // Background bytes do not.
    let mut sim = Sim::new(policy());
    sim.add_path(1, slow_declared_wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.a.path_for(Labels::NONE).is_some());
    sim.send_all(b"sync", Labels::BACKGROUND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(1), |s| s.got.len() == 4);
    assert!(!sim.a.trickler.pacing(&slow_declared_wifi(), sim.now));
    assert!(!sim.b.trickler.pacing(&b_network(&sim), sim.now));
    // Nor does the end of a background stream: its FIN is background too (once, one
    // finished download paced every other background stream of the session for 5 s).
    let other = sim.a.open_stream().unwrap();
    sim.a.send_on(other, b"more sync", Labels::BACKGROUND).unwrap();
    sim.a.shutdown_stream(other).unwrap();
    sim.a.shutdown();
    sim.run_until(Duration::from_secs(1), |s| s.b_eof && s.a.all_acked());
    assert!(!sim.a.trickler.pacing(&slow_declared_wifi(), sim.now));
    assert!(!sim.b.trickler.pacing(&b_network(&sim), sim.now));
}

// ---------------------------------------------------------------------------------------------
// Both directions, total outages, stale paths.

impl Sim {
    /// Sends from b (the accepting side) as much of `data` as it takes now.
    fn b_send_now(&mut self, data: &[u8], labels: Labels) -> usize {
        match self.b.send(data, labels) {
            Ok(n) => n,
            Err(SendError::Full) | Err(SendError::NoNetwork) => 0,
            Err(e) => panic!("b send: {e}"),
        }
    }

    /// Adds a path from a, the first path the session has had for a while (or not).
    fn established(&self) -> usize {
        self.a.path_stats().iter().filter(|p| p.established).count()
    }
}

/// What one side read from a stream, whether it reads it, and how the stream ended.
#[derive(Debug)]
struct StreamLog {
    bytes: Vec<u8>,
    reads: bool,
    end: Option<Result<(), RecvError>>,
}

impl Default for StreamLog {
    fn default() -> Self {
        StreamLog { bytes: Vec::new(), reads: true, end: None }
    }
}

/// Accepted bytes, and the label runs they were accepted with.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    labels: Vec<(usize, Labels)>,
}

impl Stream {
    fn push(&mut self, data: &[u8], labels: Labels) {
        self.bytes.extend_from_slice(data);
        if data.is_empty() {
            return;
        }
        match self.labels.last_mut() {
            Some((len, last)) if *last == labels => *len += data.len(),
            _ => self.labels.push((data.len(), labels)),
        }
    }
}

#[test]
fn every_path_vanishing_while_the_acceptor_believes_in_one_loses_nothing() {
    let mut sim = Sim::new(strict_policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 10 * MS, 250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2 && s.b.path_ids().len() == 2);
    let (mut ab, mut ba) = (Stream::default(), Stream::default());
    // Before: both directions busy, on both paths.
    let d = payload(300_000, 1);
    sim.send_all(&d, Labels::BACKGROUND, Duration::from_secs(5));
    ab.push(&d, Labels::BACKGROUND);
    let d = payload(2_000, 2);
    sim.send_all(&d, Labels::ONDEMAND, Duration::from_secs(5));
    ab.push(&d, Labels::ONDEMAND);
    let d = payload(200_000, 3);
    let n = sim.b_send_now(&d, Labels::BACKGROUND);
    ba.push(&d[..n], Labels::BACKGROUND);
    sim.run_for(15 * MS);
    assert!(sim.got.len() < ab.bytes.len() && sim.a_got.len() < ba.bytes.len(), "data must be in flight");

    // Every network goes at once. a knows; b is told nothing and keeps both paths.
    sim.total_outage();
    assert_eq!(sim.a.send(b"x", Labels::ONDEMAND), Err(SendError::NoNetwork));
    assert_eq!(sim.b.path_ids(), vec![1, 2], "b still believes in its paths");
    // b goes on sending (to paths it believes in); a long outage, longer than any timer.
    let d = payload(50_000, 4);
    let n = sim.b_send_now(&d, Labels::ONDEMAND);
    assert!(n > 0);
    ba.push(&d[..n], Labels::ONDEMAND);
    sim.run_for(Duration::from_secs(120));
    assert!(sim.b.path_stats().iter().all(|p| p.troubled), "{}", sim.b.debug_summary());
    // During: a still cannot send; what b sent meanwhile waits.
    assert_eq!(sim.a.send(b"x", Labels::BACKGROUND), Err(SendError::NoNetwork));
    let d = payload(10_000, 5);
    let n = sim.b_send_now(&d, Labels::BACKGROUND);
    ba.push(&d[..n], Labels::BACKGROUND);

    // New paths join (the old ones are still there on b); the first data is a's, sent as soon
    // as a path is up — what a resume handler does.
    sim.add_path(3, cell(), 10 * MS, 250_000);
    sim.add_path(4, wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(5), |s| s.a.path_for(Labels::BACKGROUND).is_some());
    let d = payload(3_004, 6);
    sim.send_all(&d, Labels::BACKGROUND, Duration::from_secs(5));
    ab.push(&d, Labels::BACKGROUND);
    // After: more both ways.
    let d = payload(100_000, 7);
    sim.send_all(&d, Labels::ONDEMAND, Duration::from_secs(30));
    ab.push(&d, Labels::ONDEMAND);
    let d = payload(40_000, 8);
    let n = sim.b_send_now(&d, Labels::SMALL);
    ba.push(&d[..n], Labels::SMALL);
    sim.run_until(Duration::from_secs(120), |s| {
        s.got.len() >= ab.bytes.len() && s.a_got.len() >= ba.bytes.len() && s.a.all_acked() && s.b.all_acked()
    });
    assert!(sim.got == ab.bytes, "a to b: {} of {} bytes, not the same", sim.got.len(), ab.bytes.len());
    assert!(sim.a_got == ba.bytes, "b to a: {} of {} bytes, not the same", sim.a_got.len(), ba.bytes.len());
    assert_eq!(sim.got_labels, ab.labels);
    assert_eq!(sim.a_got_labels, ba.labels);
}

/// What happens to paths and data in one step of an outage history.
#[derive(Clone, Debug)]
enum Ev {
    /// a sends n bytes with labels #l.
    SendA(usize, u8),
    /// b sends.
    SendB(usize, u8),
    Run(u16),
    /// A path's connection stalls (and may come back).
    Stall(u8),
    Unstall(u8),
    /// A path's connection dies; a notices (its network went down), b does not.
    DownAtA(u8),
    /// A path's connection dies; b notices (a reset), a does not.
    ResetAtB(u8),
    /// A path's connection dies and nobody notices.
    Silent(u8),
    /// Every connection dies; a drops all its paths.
    TotalOutage,
    /// a dials a new path.
    Add(u8),
}

fn history() -> impl Strategy<Value = Vec<Ev>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (1usize..40_000, 0u8..4).prop_map(|(n, l)| Ev::SendA(n, l)),
            3 => (1usize..40_000, 0u8..4).prop_map(|(n, l)| Ev::SendB(n, l)),
            4 => (1u16..3000).prop_map(Ev::Run),
            1 => any::<u8>().prop_map(Ev::Stall),
            1 => any::<u8>().prop_map(Ev::Unstall),
            1 => any::<u8>().prop_map(Ev::DownAtA),
            1 => any::<u8>().prop_map(Ev::ResetAtB),
            1 => any::<u8>().prop_map(Ev::Silent),
            1 => Just(Ev::TotalOutage),
            2 => any::<u8>().prop_map(Ev::Add),
        ],
        1..50,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever dies, in whatever order, seen by one side, both or neither, and however long
    /// no path is left: once paths exist again, both sides get exactly the bytes the other's
    /// sends accepted — once, in order, with their labels.
    #[test]
    fn any_outage_history_delivers_both_streams(h in history()) {
        run_history(h);
    }
}

fn run_history(h: Vec<Ev>) {
    let labels = |l: u8| [Labels::NONE, Labels::ONDEMAND, Labels::BACKGROUND, Labels::SMALL][l as usize % 4];
    let mut sim = Sim::new(strict_policy());
    let mut next_id = 2;
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 10 * MS, 500_000);
    let (mut ab, mut ba) = (Stream::default(), Stream::default());
    let side = sim.a.open_stream().unwrap();
    sim.a_streams.insert(side, StreamLog::default());
    let (mut side_a, mut side_b) = (Vec::new(), Vec::new());
    let pick = |sim: &Sim, i: u8| {
        let ids: Vec<PathId> = sim.links.iter().filter(|(_, l)| !l.dead).map(|(&id, _)| id).collect();
        (!ids.is_empty()).then(|| ids[i as usize % ids.len()])
    };
    for ev in h {
        match ev {
            Ev::SendA(n, l) if n % 3 == 0 => {
                // On a second stream, both ways (b answers on it once it has seen it).
                let data = payload(n, side_a.len() as u8 ^ 0x33);
                let k = match sim.a.send_on(side, &data, labels(l)) {
                    Ok(k) => k,
                    Err(SendError::Full | SendError::NoNetwork) => 0,
                    Err(e) => panic!("a send on {side}: {e}"),
                };
                side_a.extend_from_slice(&data[..k]);
            }
            Ev::SendB(n, l) if n % 3 == 0 => {
                let data = payload(n, side_b.len() as u8 ^ 0x77);
                let k = match sim.b.send_on(side, &data, labels(l)) {
                    Ok(k) => k,
                    Err(SendError::Full | SendError::NoNetwork | SendError::NoStream(_)) => 0,
                    Err(e) => panic!("b send on {side}: {e}"),
                };
                side_b.extend_from_slice(&data[..k]);
            }
            Ev::SendA(n, l) => {
                let data = payload(n, ab.bytes.len() as u8);
                let k = match sim.a.send(&data, labels(l)) {
                    Ok(k) => k,
                    Err(SendError::Full | SendError::NoNetwork) => 0,
                    Err(e) => panic!("a send: {e}"),
                };
                ab.push(&data[..k], labels(l));
            }
            Ev::SendB(n, l) => {
                let data = payload(n, ba.bytes.len() as u8 ^ 0x55);
                let k = sim.b_send_now(&data, labels(l));
                ba.push(&data[..k], labels(l));
            }
            Ev::Run(ms) => sim.run_for(Duration::from_millis(ms as u64)),
            Ev::Stall(i) | Ev::Unstall(i) => {
                if let Some(id) = pick(&sim, i) {
                    let up = matches!(ev, Ev::Unstall(_));
                    let link = sim.links.get_mut(&id).unwrap();
                    link.up_ab = up;
                    link.up_ba = up;
                }
            }
            Ev::DownAtA(i) | Ev::ResetAtB(i) | Ev::Silent(i) => {
                if let Some(id) = pick(&sim, i) {
                    sim.kill(id);
                    match ev {
                        Ev::DownAtA(_) => sim.a.remove_path(id, "network went down", sim.now),
                        Ev::ResetAtB(_) => sim.b.remove_path(id, "reset", sim.now),
                        _ => {}
                    }
                }
            }
            Ev::TotalOutage => sim.total_outage(),
            Ev::Add(i) => {
                next_id += 1;
                let n = if i % 2 == 0 { wifi() } else { cell() };
                sim.add_path(next_id, n, 15 * MS, 2_000_000);
            }
        }
    }
    // Heal: stalled connections move again, and a dials one fresh path per network.
    for l in sim.links.values_mut() {
        l.up_ab = true;
        l.up_ba = true;
    }
    sim.add_path(100, wifi(), 20 * MS, 6_250_000);
    sim.add_path(101, cell(), 10 * MS, 500_000);
    sim.run_until(Duration::from_secs(900), |s| {
        s.got.len() >= ab.bytes.len() && s.a_got.len() >= ba.bytes.len() && s.a.all_acked() && s.b.all_acked()
    });
    let side_got_b = sim.b_streams.get(&side).map_or(&[][..], |l| &l.bytes[..]);
    assert!(
        side_got_b == &side_a[..],
        "stream {side}, a to b: {} of {} bytes",
        side_got_b.len(),
        side_a.len()
    );
    assert!(
        sim.a_streams[&side].bytes == side_b,
        "stream {side}, b to a: {} of {}",
        sim.a_streams[&side].bytes.len(),
        side_b.len()
    );
    assert!(sim.got == ab.bytes, "a to b: {} of {} bytes, not the same", sim.got.len(), ab.bytes.len());
    assert!(sim.a_got == ba.bytes, "b to a: {} of {} bytes, not the same", sim.a_got.len(), ba.bytes.len());
    assert_eq!(sim.got_labels, ab.labels);
    assert_eq!(sim.a_got_labels, ba.labels);
}

#[test]
fn tiny_pieces_cannot_multiply_what_the_receiver_holds() {
    let now = Instant::now();
    let mut b = Session::new(Role::Accepting, SessionId([3; 16]), SessionConfig::default(), policy());
    b.add_path(1, wifi(), now);
    let frame = |offset: u64, byte: u8| {
        let mut out = BytesMut::new();
        Frame::Data {
            seq: offset,
            stream: 0,
            offset,
            labels: Labels::NONE,
            fin: false,
            data: Bytes::from(vec![byte]),
        }
        .encode(&mut out);
        out
    };
    // 200,000 one-byte frames in order, each in a read buffer of its own, nobody reading:
    // joined into a handful of pieces, none of them keeping a read buffer alive.
    for i in 0..200_000u64 {
        let mut read_buffer = BytesMut::with_capacity(256 * 1024);
        read_buffer.extend_from_slice(&frame(i, i as u8));
        b.handle_input_owned(1, read_buffer, now).unwrap();
    }
    assert!(b.held_pieces() <= 4, "{} pieces held", b.held_pieces());
    // Then one-byte pieces with gaps: at most MAX_OUT_OF_ORDER are kept.
    for i in 0..20_000u64 {
        b.handle_input(1, &frame(200_001 + 2 * i, 7), now).unwrap();
    }
    assert!(b.held_pieces() <= MAX_OUT_OF_ORDER + 4, "{} pieces held", b.held_pieces());
    // Everything in order reads back intact, and the first gap filled delivers what it joins.
    b.handle_input(1, &frame(200_000, 9), now).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let Ok((n, _)) = b.recv(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), 200_002);
    assert!(got[..200_000].iter().enumerate().all(|(i, &v)| v == i as u8));
    assert_eq!(&got[200_000..], &[9, 7]);
}

#[test]
fn alternating_labels_cannot_multiply_what_the_receiver_holds_either() {
    let now = Instant::now();
    let mut b = Session::new(Role::Accepting, SessionId([4; 16]), SessionConfig::default(), policy());
    b.add_path(1, wifi(), now);
    // One byte per frame, the labels changing every byte: nothing can be joined.
    for i in 0..40_000u64 {
        let labels = if i % 2 == 0 { Labels::ONDEMAND } else { Labels::BACKGROUND };
        let mut out = BytesMut::new();
        Frame::Data { seq: i, stream: 0, offset: i, labels, fin: false, data: Bytes::from(vec![i as u8]) }
            .encode(&mut out);
        b.handle_input(1, &out, now).unwrap();
    }
    assert!(b.held_pieces() <= MAX_HELD, "{} pieces held", b.held_pieces());
    // What was held reads back in order, each read one label set; the rest was never
    // acknowledged, so the sender still owes it.
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while let Ok((n, l)) = b.recv(&mut buf) {
        assert_eq!(n, 1);
        assert_eq!(l, if got.len() % 2 == 0 { Labels::ONDEMAND } else { Labels::BACKGROUND });
        got.push(buf[0]);
    }
    assert_eq!(got.len(), MAX_HELD);
    assert!(got.iter().enumerate().all(|(i, &v)| v == i as u8));
    let mut ack = BytesMut::new();
    let t = b.poll_transmit(1, now);
    if let Some(t) = t {
        ack.extend_from_slice(&t.header);
    }
    let mut d = FrameDecoder::new();
    d.push(&ack);
    let mut cumulative = None;
    while let Ok(Some(f)) = d.next_frame() {
        if let Frame::Ack { cumulative: c, .. } = f {
            cumulative = Some(c);
        }
    }
    assert_eq!(cumulative, Some(MAX_HELD as u64), "acknowledged exactly what was kept");
}

// ---------------------------------------------------------------------------------------------
// Streams.

/// Sends all of `data` on stream `id` from a, stepping the simulation while it is full.
fn send_all_on(sim: &mut Sim, id: StreamId, data: &[u8], labels: Labels, limit: Duration) {
    let mut off = 0;
    let end = sim.now + limit;
    while off < data.len() {
        match sim.a.send_on(id, &data[off..], labels) {
            Ok(n) => off += n,
            Err(SendError::Full | SendError::NoNetwork) => {
                assert!(sim.now < end, "send on {id} stuck at {off}: {}", sim.a.debug_summary());
                if !sim.step() {
                    sim.now += MS;
                }
            }
            Err(e) => panic!("send on {id}: {e}"),
        }
    }
}

fn two_paths() -> Sim {
    let mut sim = Sim::new(policy());
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.add_path(2, cell(), 10 * MS, 1_000_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2);
    sim
}

#[test]
fn a_stalled_chunk_of_one_stream_never_delays_another() {
    let mut sim = two_paths();
    let (bulk, chat) = (sim.a.open_stream().unwrap(), sim.a.open_stream().unwrap());
    let big = payload(300_000, 1);
    send_all_on(&mut sim, bulk, &big, Labels::BACKGROUND, Duration::from_secs(5));
    sim.run_for(5 * MS);
    // Wi-Fi, which carries the bulk stream, stalls with its chunks on the wire.
    let link = sim.links.get_mut(&1).unwrap();
    link.up_ab = false;
    link.up_ba = false;
    link.held_ab.extend(link.ab.drain(..).map(|p| p.bytes));
    let msg = payload(2_000, 2);
    send_all_on(&mut sim, chat, &msg, Labels::ONDEMAND, Duration::from_secs(1));
    // The on-demand stream arrives over cell, whole, while the bulk one is stuck.
    sim.run_until(Duration::from_millis(200), |s| {
        s.b_streams.get(&chat).is_some_and(|l| l.bytes.len() == msg.len())
    });
    assert_eq!(sim.b_streams[&chat].bytes, msg);
    assert!(sim.b_streams.get(&bulk).is_none_or(|l| l.bytes.len() < big.len()));
    // The bulk stream is resent elsewhere (or Wi-Fi returns) and completes too.
    sim.run_until(Duration::from_secs(60), |s| {
        s.b_streams.get(&bulk).is_some_and(|l| l.bytes.len() == big.len())
    });
    assert_eq!(sim.b_streams[&bulk].bytes, big);
}

#[test]
fn a_stream_whose_reader_stops_closes_only_its_own_window() {
    let mut sim = two_paths();
    let (stuck, flowing) = (sim.a.open_stream().unwrap(), sim.a.open_stream().unwrap());
    // b accepts both but never reads the first.
    sim.send_all(b"", Labels::NONE, Duration::from_secs(1));
    let first = payload(10, 3);
    send_all_on(&mut sim, stuck, &first, Labels::BACKGROUND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(1), |s| s.b_streams.contains_key(&stuck));
    sim.b_streams.get_mut(&stuck).unwrap().reads = false;
    // a fills the stuck stream's window: its sends stop there.
    let mut taken = first.len();
    for _ in 0..3000 {
        match sim.a.send_on(stuck, &payload(64 * 1024, 4), Labels::BACKGROUND) {
            Ok(n) => taken += n,
            Err(SendError::Full) => {}
            Err(e) => panic!("{e}"),
        }
        sim.step();
    }
    let window = SessionConfig::default().stream_window as usize;
    assert!(taken <= window + 64 * 1024, "the stuck stream took {taken} bytes");
    assert_eq!(sim.a.send_on(stuck, b"x", Labels::BACKGROUND), Err(SendError::Full));
    // The other stream moves 3 MB regardless.
    let data = payload(3_000_000, 5);
    send_all_on(&mut sim, flowing, &data, Labels::BACKGROUND, Duration::from_secs(60));
    sim.run_until(Duration::from_secs(60), |s| {
        s.b_streams.get(&flowing).is_some_and(|l| l.bytes.len() == data.len())
    });
    assert_eq!(sim.b_streams[&flowing].bytes, data);
    // Reading the stuck stream lets it go on.
    sim.b_streams.get_mut(&stuck).unwrap().reads = true;
    send_all_on(&mut sim, stuck, b"more", Labels::BACKGROUND, Duration::from_secs(10));
    sim.run_until(Duration::from_secs(10), |s| s.b_streams[&stuck].bytes.ends_with(b"more"));
    assert_eq!(sim.b_streams[&stuck].bytes.len(), taken + 4);
}

#[test]
fn fin_is_a_half_close_and_reset_and_stop_sending_reach_the_peer() {
    let mut sim = two_paths();
    // Half-close: a's request ends with FIN; b still answers on the same stream.
    let req = sim.a.open_stream().unwrap();
    send_all_on(&mut sim, req, b"GET / HTTP/1.0\r\n\r\n", Labels::ONDEMAND, Duration::from_secs(1));
    sim.a.shutdown_stream(req).unwrap();
    assert_eq!(sim.a.send_on(req, b"x", Labels::ONDEMAND), Err(SendError::Shutdown));
    sim.run_until(Duration::from_secs(5), |s| s.b_streams.get(&req).is_some_and(|l| l.end.is_some()));
    assert_eq!(sim.b_streams[&req].bytes, b"GET / HTTP/1.0\r\n\r\n");
    assert_eq!(sim.b_streams[&req].end, Some(Ok(())));
    let answer = payload(100_000, 6);
    assert_eq!(sim.b.send_on(req, &answer, Labels::ONDEMAND), Ok(answer.len()));
    sim.b.shutdown_stream(req).unwrap();
    sim.a_streams.insert(req, StreamLog::default());
    sim.run_until(Duration::from_secs(10), |s| s.a_streams[&req].end.is_some());
    assert_eq!(sim.a_streams[&req].bytes, answer);
    // Both halves over and acknowledged: the stream is gone on both sides.
    sim.run_until(Duration::from_secs(5), |s| {
        !s.a.stream_ids().contains(&req)
            && !s.b.stream_ids().contains(&req)
            && s.a.all_acked()
            && s.b.all_acked()
    });

    // A reset reaches the peer's reads with its code.
    let doomed = sim.a.open_stream().unwrap();
    send_all_on(&mut sim, doomed, b"partial", Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(5), |s| s.b_streams.contains_key(&doomed));
    sim.a.reset_stream(doomed, 7).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.b_streams[&doomed].end.is_some());
    assert_eq!(sim.b_streams[&doomed].end, Some(Err(RecvError::StreamReset(7))));

    // STOP_SENDING: b stops reading; a's next sends fail with b's code, and b sees a reset.
    let unwanted = sim.a.open_stream().unwrap();
    send_all_on(&mut sim, unwanted, b"hello", Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(5), |s| s.b_streams.contains_key(&unwanted));
    sim.b.stop_sending(unwanted, 9).unwrap();
    let mut stopped = false;
    for _ in 0..10_000 {
        match sim.a.send_on(unwanted, b"x", Labels::ONDEMAND) {
            Err(SendError::Stopped(9)) => {
                stopped = true;
                break;
            }
            Ok(_) | Err(SendError::Full) => {}
            Err(e) => panic!("{e}"),
        }
        if !sim.step() {
            sim.now += MS;
        }
    }
    assert!(stopped, "STOP_SENDING never reached the sender");
    // Every stream of the test is over on both sides now.
    sim.a.shutdown_stream(doomed).unwrap_or(());
    sim.run_for(Duration::from_secs(2));
    assert!(sim.a.all_acked() && sim.b.all_acked());
}

#[test]
fn many_streams_each_arrive_whole_whatever_paths_they_take() {
    let mut sim = two_paths();
    for l in sim.links.values_mut() {
        l.jitter = 20 * MS;
    }
    let ids: Vec<StreamId> = (0..100).map(|_| sim.a.open_stream().unwrap()).collect();
    let labels = [Labels::BACKGROUND, Labels::ONDEMAND, Labels::SMALL, Labels::NONE];
    for round in 0..5 {
        for (i, &id) in ids.iter().enumerate() {
            let piece = payload(3_000 + i * 7, (i + round) as u8);
            send_all_on(&mut sim, id, &piece, labels[(i + round) % 4], Duration::from_secs(30));
        }
    }
    for &id in &ids {
        sim.a.shutdown_stream(id).unwrap();
    }
    let done = |s: &Sim| ids.iter().all(|id| s.b_streams.get(id).is_some_and(|l| l.end.is_some()));
    sim.run_for(Duration::from_secs(60));
    if !done(&sim) {
        let missing: Vec<(StreamId, usize, bool)> = ids
            .iter()
            .filter(|id| sim.b_streams.get(id).is_none_or(|l| l.end.is_none()))
            .map(|id| {
                (*id, sim.b_streams.get(id).map_or(0, |l| l.bytes.len()), sim.b_streams.contains_key(id))
            })
            .collect();
        panic!("unfinished: {missing:?}\na: {}\nb: {}", sim.a.debug_summary(), sim.b.debug_summary());
    }
    for (i, &id) in ids.iter().enumerate() {
        let want: Vec<u8> = (0..5).flat_map(|round| payload(3_000 + i * 7, (i + round) as u8)).collect();
        assert!(sim.b_streams[&id].bytes == want, "stream {id} differs");
        assert_eq!(sim.b_streams[&id].end, Some(Ok(())));
    }
}

#[test]
fn streams_beyond_the_limit_or_never_opened_are_protocol_errors() {
    let now = Instant::now();
    let mut b = Session::new(Role::Accepting, SessionId([5; 16]), SessionConfig::default(), policy());
    b.add_path(1, wifi(), now);
    let data = |seq: u64, stream: StreamId| {
        let mut out = BytesMut::new();
        Frame::Data {
            seq,
            stream,
            offset: 0,
            labels: Labels::NONE,
            fin: false,
            data: Bytes::from_static(b"x"),
        }
        .encode(&mut out);
        out
    };
    // An odd stream is the accepting side's own: the peer cannot open it.
    assert!(matches!(
        b.handle_input(1, &data(0, 1), now),
        Err(SessionError::Protocol(ProtocolError::UnopenedStream { stream: 1 }))
    ));
    for i in 0..MAX_STREAMS as u64 {
        b.handle_input(1, &data(1 + i, 2 + 2 * i as StreamId), now).unwrap();
    }
    let over = 2 + 2 * MAX_STREAMS as StreamId;
    assert!(matches!(
        b.handle_input(1, &data(5000, over), now),
        Err(SessionError::Protocol(ProtocolError::TooManyStreams { .. }))
    ));
}

#[test]
fn ranges_past_the_end_of_the_number_space_are_protocol_errors() {
    // Found by the session_input fuzz target: a sequence number or offset near 2^64 whose end
    // wraps once panicked on the overflow.
    let now = Instant::now();
    let frame = |seq: u64, offset: u64| {
        let mut out = BytesMut::new();
        Frame::Data {
            seq,
            stream: 0,
            offset,
            labels: Labels::NONE,
            fin: false,
            data: Bytes::from_static(b"xy"),
        }
        .encode(&mut out);
        out
    };
    for (seq, offset) in [(u64::MAX - 1, 0), (0, u64::MAX - 1)] {
        let mut b = Session::new(Role::Accepting, SessionId([6; 16]), SessionConfig::default(), policy());
        b.add_path(1, wifi(), now);
        // (The decoder itself refuses an offset that wraps.)
        let r = b.handle_input(1, &frame(seq, offset), now);
        assert!(
            matches!(
                r,
                Err(SessionError::Protocol(ProtocolError::RangeOverflow { .. }))
                    | Err(SessionError::Frame(_))
            ),
            "{r:?}"
        );
    }
    let mut b = Session::new(Role::Accepting, SessionId([6; 16]), SessionConfig::default(), policy());
    b.add_path(1, wifi(), now);
    let mut out = BytesMut::new();
    Frame::MaxStreamData { seq: u64::MAX, stream: 0, max: 1 }.encode(&mut out);
    assert!(matches!(
        b.handle_input(1, &out, now),
        Err(SessionError::Protocol(ProtocolError::RangeOverflow { .. }))
    ));
}

#[test]
fn a_stream_read_to_its_last_byte_still_ends_or_fails_after_it_is_retired() {
    // Seen with 100 streams at once: the reader took the last byte, both halves were over and
    // acknowledged, the stream was retired, and the reader's next read — which must say "end
    // of stream" — failed with "no stream".
    let mut sim = two_paths();
    let id = sim.a.open_stream().unwrap();
    sim.b_streams.insert(id, StreamLog { reads: false, ..StreamLog::default() });
    send_all_on(&mut sim, id, b"hello", Labels::ONDEMAND, Duration::from_secs(1));
    sim.a.shutdown_stream(id).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.b.stream_ids().contains(&id) && s.b.stream_readable(id));
    let mut buf = [0u8; 5];
    assert_eq!(sim.b.recv_on(id, &mut buf), Ok((5, Labels::ONDEMAND)));
    sim.b.shutdown_stream(id).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.a.all_acked() && s.b.all_acked());
    sim.run_for(Duration::from_secs(1));
    assert!(sim.b.stream_readable(id));
    for _ in 0..2 {
        assert_eq!(sim.b.recv_on(id, &mut buf), Ok((0, Labels::NONE)));
    }
    assert_eq!(sim.b.send_on(id, b"x", Labels::ONDEMAND), Err(SendError::Shutdown));

    // A reset that the reader has not seen yet is not lost to the stream's retirement.
    let id = sim.a.open_stream().unwrap();
    sim.b_streams.insert(id, StreamLog { reads: false, ..StreamLog::default() });
    send_all_on(&mut sim, id, b"partial", Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(5), |s| s.b.stream_ids().contains(&id) && s.b.stream_readable(id));
    sim.a.reset_stream(id, 7).unwrap();
    sim.b.shutdown_stream(id).unwrap();
    sim.run_until(Duration::from_secs(5), |s| s.a.all_acked() && s.b.all_acked());
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.b.recv_on(id, &mut buf), Err(RecvError::StreamReset(7)));
}

#[test]
fn writers_blocked_on_the_session_are_woken_oldest_first_as_room_allows_and_none_is_forgotten() {
    // 8 writers of 256 KiB each behind a 512 KiB send buffer; a writer tries again only when
    // woken. Each acknowledgement wakes as many as the room it freed can take, not all of
    // them; and every writer finishes (no wakeup is lost).
    let cfg = SessionConfig { send_buffer: 512 << 10, ..SessionConfig::default() };
    let mut sim = Sim::with_config(policy(), cfg);
    sim.add_path(1, wifi(), 20 * MS, 6_250_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 1);
    let data = payload(256 << 10, 3);
    let ids: Vec<StreamId> = (0..8).map(|_| sim.a.open_stream().unwrap()).collect();
    let mut sent: BTreeMap<StreamId, usize> = ids.iter().map(|&id| (id, 0)).collect();
    let mut want: Vec<StreamId> = ids.clone();
    let (mut most_woken, mut wakeups) = (0, 0);
    let end = sim.now + Duration::from_secs(30);
    while sent.values().any(|&n| n < data.len()) {
        // A woken writer writes until it is done or finds no room (as `write_all` does).
        for id in std::mem::take(&mut want) {
            while sent[&id] < data.len() {
                match sim.a.send_on(id, &data[sent[&id]..], Labels::BACKGROUND) {
                    Ok(n) => *sent.get_mut(&id).unwrap() += n,
                    Err(SendError::Full) => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        let (_, woken) = sim.a.take_wakeups();
        if !woken.is_empty() {
            wakeups += 1;
            if !sim.a.all_acked() {
                most_woken = most_woken.max(woken.len());
            }
        }
        want = woken;
        assert!(sim.now < end, "writers stuck: {sent:?}");
        if !sim.step() {
            sim.now += MS;
        }
    }
    assert!(wakeups > 0);
    assert!(most_woken < 6, "one acknowledgement woke {most_woken} writers");
    sim.run_until(Duration::from_secs(30), |s| s.a.all_acked());
}

#[test]
fn a_refused_path_ends_alone_and_an_unknown_session_ends_the_session() {
    let now = Instant::now();
    let close = |code: u8, reason: &str| {
        let mut out = BytesMut::new();
        Frame::Close { code, reason: reason.into() }.encode(&mut out);
        out
    };
    let mut a = Session::new(Role::Connecting, SessionId([8; 16]), SessionConfig::default(), policy());
    a.add_path(1, wifi(), now);
    a.add_path(2, cell(), now);
    // A TLS listener refuses a second first path (it must join with a proof): that path goes,
    // the session stays, and path 1 may still be welcomed.
    a.handle_input(2, &close(frame::CLOSE_PATH_REFUSED, "the session exists: join with a proof"), now)
        .unwrap();
    assert_eq!(a.path_ids(), vec![1]);
    assert!(a.closed().is_none());
    // A listener that does not know the session: it is over.
    a.handle_input(1, &close(frame::CLOSE_UNKNOWN_SESSION, "unknown session"), now).unwrap();
    assert!(a.closed().is_some_and(|r| r.contains("unknown session")));
}

#[test]
fn ondemand_chunks_on_a_network_that_flapped_lately_also_go_out_on_another() {
    // ONDEMAND takes the lowest RTT: cell. Cell loses its path and comes back.
    let mut sim = two_paths();
    sim.a.remove_path(2, "flap", sim.now);
    sim.kill(2);
    sim.add_path(3, cell(), 10 * MS, 1_000_000);
    sim.run_until(Duration::from_secs(1), |s| s.established() == 2);
    assert_eq!(sim.a.path_for(Labels::ONDEMAND), Some(3));
    // While it is unsure, an ONDEMAND message goes on both networks, and arrives once.
    let msg = payload(20_000, 4);
    sim.send_all(&msg, Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(5), |s| s.got.len() == msg.len() && s.a.all_acked());
    assert_eq!(sim.got, msg);
    let copied = sim.a.redundant_bytes();
    assert!(copied >= msg.len() as u64 / 2, "only {copied} bytes sent twice");
    // Background traffic never pays for it.
    let bulk = payload(50_000, 5);
    sim.send_all(&bulk, Labels::BACKGROUND, Duration::from_secs(5));
    sim.run_until(Duration::from_secs(10), |s| s.got.len() == msg.len() + bulk.len() && s.a.all_acked());
    assert_eq!(sim.a.redundant_bytes(), copied);
    // Once the network has been steady for FLAP_MEMORY, ONDEMAND goes on it alone again.
    sim.run_for(FLAP_MEMORY);
    let more = payload(20_000, 6);
    sim.send_all(&more, Labels::ONDEMAND, Duration::from_secs(1));
    sim.run_until(Duration::from_secs(5), |s| s.got.len() == msg.len() + bulk.len() + more.len());
    assert_eq!(sim.a.redundant_bytes(), copied);
    assert!(sim.got.ends_with(&more));
}
