-- Feature vector of `ciciomt-flow-window/v1` events.
--
-- Tables: `events` = the decoded event batch (one row per event; metric columns as
-- on the wire), `twin` = per event, the device's twin as it was BEFORE the event
-- (`<metric>__x` this event's transformed value, `__mean`/`__sd` the device's own
-- baseline, NULL while it warms up, `__prev` its previous value, `__win` its
-- short-window average; `gap__*` inter-arrival time, `rate_per_s`, `events_seen`,
-- `new_peer`, `drift_count`, `twin_distance`, `twin_score`).
--
-- Contract: select `_partition`, `_offset` first, then numeric features; exactly one
-- row per event (inner join on the coordinates, no filters). The same query computes
-- training features offline and live features in the stream.
--
-- CICIoMT2024 rows are aggregates over packet windows of captures, with no stable
-- device identity and no meaningful order: a device baseline or window over rows
-- would measure the capture's file order, not behaviour. This vector is therefore
-- the window features alone; the twin still scores behaviour for the ensemble.
SELECT
  e._partition,
  e._offset,
  -- raw window features (heavy-tailed ones on a log scale)
  ln(1.0 + greatest(e.header_length, 0.0)) AS header_length,
  e.protocol_type AS protocol_type,
  e.time_to_live AS time_to_live,
  ln(1.0 + greatest(e.rate, 0.0)) AS rate,
  e.fin_flag_number AS fin_flag_number,
  e.syn_flag_number AS syn_flag_number,
  e.rst_flag_number AS rst_flag_number,
  e.psh_flag_number AS psh_flag_number,
  e.ack_flag_number AS ack_flag_number,
  e.ece_flag_number AS ece_flag_number,
  e.cwr_flag_number AS cwr_flag_number,
  ln(1.0 + greatest(e.ack_count, 0.0)) AS ack_count,
  ln(1.0 + greatest(e.syn_count, 0.0)) AS syn_count,
  ln(1.0 + greatest(e.fin_count, 0.0)) AS fin_count,
  ln(1.0 + greatest(e.rst_count, 0.0)) AS rst_count,
  e.http AS http,
  e.https AS https,
  e.dns AS dns,
  e.telnet AS telnet,
  e.smtp AS smtp,
  e.ssh AS ssh,
  e.irc AS irc,
  e.tcp AS tcp,
  e.udp AS udp,
  e.dhcp AS dhcp,
  e.arp AS arp,
  e.icmp AS icmp,
  e.igmp AS igmp,
  e.ipv AS ipv,
  e.llc AS llc,
  ln(1.0 + greatest(e.tot_sum, 0.0)) AS tot_sum,
  ln(1.0 + greatest(e.min, 0.0)) AS min,
  ln(1.0 + greatest(e.max, 0.0)) AS max,
  ln(1.0 + greatest(e.avg, 0.0)) AS avg,
  ln(1.0 + greatest(e.std, 0.0)) AS std,
  ln(1.0 + greatest(e.tot_size, 0.0)) AS tot_size,
  ln(1.0 + greatest(e.iat, 0.0)) AS iat,
  ln(1.0 + greatest(e.number, 0.0)) AS number,
  ln(1.0 + greatest(e.variance, 0.0)) AS variance,
  -- the twin's behavioural distance (its score is an ensemble member)
  t.behaviour_distance AS behaviour_distance
FROM events e
JOIN twin t ON e._partition = t._partition AND e._offset = t._offset
