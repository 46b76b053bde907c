//! Class names from dataset labels: binary, family and fine class.
//!
//! WUSTL-EHMS-2020 labels are `normal`, `Spoofing`, `Data Alteration` (its
//! `Attack Category`). CICIoMT2024 labels are capture file names such as
//! `WiFi_and_MQTT_test_TCP_IP-DDoS-SYN_test.pcap`: the fine class is the attack
//! part (`DDoS-SYN`, 19 classes), the family one of Benign, DDoS, DoS, Recon, MQTT,
//! Spoofing.

/// The fine class of a raw label; `normal` for normal traffic of any dataset.
pub fn fine_class(raw: &str) -> String {
    let s = raw.trim();
    let s = s.rsplit('/').next().unwrap_or(s);
    let s = s.strip_suffix(".csv").unwrap_or(s);
    let s = s.strip_suffix(".pcap").unwrap_or(s);
    let s = s.strip_suffix("_test").or_else(|| s.strip_suffix("_train")).unwrap_or(s);
    let s = s.strip_prefix("WiFi_and_MQTT_test_").or_else(|| s.strip_prefix("WiFi_and_MQTT_train_")).unwrap_or(s);
    let s = s.strip_prefix("TCP_IP-").unwrap_or(s);
    // Numbered capture parts (e.g. `DDoS-UDP1`) are one class.
    let s = s.trim_end_matches(|c: char| c.is_ascii_digit());
    let lower = s.to_ascii_lowercase();
    if lower == "benign" || lower == "normal" || lower == "0" {
        return NORMAL.to_string();
    }
    if lower == "1" {
        return "attack".to_string();
    }
    if lower.starts_with("arp_spoofing") || lower == "spoofing" && raw.contains("ARP") {
        return "ARP_Spoofing".to_string();
    }
    s.to_string()
}

/// The canonical name of the normal class.
pub const NORMAL: &str = "normal";

/// The family of a fine class (CICIoMT2024's 6 families; WUSTL's classes are their
/// own family).
pub fn family(fine: &str) -> String {
    let l = fine.to_ascii_lowercase();
    if l == NORMAL {
        NORMAL.to_string()
    } else if l.starts_with("mqtt") {
        "MQTT".to_string()
    } else if l.starts_with("ddos") {
        "DDoS".to_string()
    } else if l.starts_with("dos") {
        "DoS".to_string()
    } else if l.starts_with("recon") {
        "Recon".to_string()
    } else if l.contains("spoofing") && l.starts_with("arp") {
        "Spoofing".to_string()
    } else {
        fine.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciciomt_file_names_map_to_classes_and_families() {
        let cases = [
            ("WiFi_and_MQTT_test_TCP_IP-DDoS-SYN_test.pcap", "DDoS-SYN", "DDoS"),
            ("WiFi_and_MQTT_test_TCP_IP-DoS-UDP_test.pcap", "DoS-UDP", "DoS"),
            ("WiFi_and_MQTT_test_TCP_IP-DDoS-UDP1_test.pcap", "DDoS-UDP", "DDoS"),
            ("WiFi_and_MQTT_test_MQTT-DDoS-Connect_Flood_test.pcap", "MQTT-DDoS-Connect_Flood", "MQTT"),
            ("WiFi_and_MQTT_test_Recon-Port_Scan_test.pcap", "Recon-Port_Scan", "Recon"),
            ("WiFi_and_MQTT_test_ARP_Spoofing_test.pcap", "ARP_Spoofing", "Spoofing"),
            ("WiFi_and_MQTT_test_Benign_test.pcap", "normal", "normal"),
            ("ARP_Spoofing_train.pcap.csv", "ARP_Spoofing", "Spoofing"),
            ("normal", "normal", "normal"),
            ("Spoofing", "Spoofing", "Spoofing"),
            ("Data Alteration", "Data Alteration", "Data Alteration"),
        ];
        for (raw, fine, fam) in cases {
            assert_eq!(fine_class(raw), fine, "{raw}");
            assert_eq!(family(&fine_class(raw)), fam, "{raw}");
        }
    }
}
