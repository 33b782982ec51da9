//! FTP in passive mode through the forwarder, as Cloudflare's Spectrum FTP guide sets
//! it up: one app for the control port (tcp/21) and one for the passive data port
//! range (tcp/20000-20020), vsftpd in `origin` announcing the edge address
//! (`pasv_address`), curl in `client` listing, downloading and uploading with PASV
//! and with EPSV; the files arrive intact.
//!
//! Root, after `cargo build -p forwarder`: `cargo test -p forwarder-tests --test tcp_ftp`.

mod tcp_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use forwarder_tests::{Lab, ORIGIN_V4, OutputOk as _, require_root};
use tcp_support::*;

const APPS: &str = "[[apps]]\nid = \"ftp\"\nprotocol = \"tcp/21\"\norigin_direct = [\"tcp://10.0.2.2:21\"]\n\n\
[[apps]]\nid = \"ftp-data\"\nprotocol = \"tcp/20000-20020\"\norigin_direct = [\"tcp://10.0.2.2:20000-20020\"]\n";

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Stream64::new(seed).fill(&mut v);
    v
}

#[test]
fn ftp_passive_list_download_upload_pasv_and_epsv() {
    init();
    if !require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let dir = TempDir::new("ftp");
    let root = dir.path().join("root");
    let upload = root.join("upload");
    let empty = dir.path().join("empty");
    for d in [&root, &upload, &empty] {
        std::fs::create_dir_all(d).unwrap();
    }
    // The chroot must not be writable by the anonymous user; its upload dir must be.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&upload, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let download = random_bytes(11, 3 * 1024 * 1024 + 17);
    std::fs::write(root.join("file.bin"), &download).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    let conf = format!(
        "listen=YES\nlisten_ipv6=NO\nlisten_address=10.0.2.2\nlisten_port=21\nbackground=NO\n\
         anonymous_enable=YES\nlocal_enable=NO\nno_anon_password=YES\nanon_root={root}\n\
         ftp_username=ftp\nwrite_enable=YES\nanon_upload_enable=YES\nanon_umask=022\n\
         pasv_enable=YES\npasv_min_port=20000\npasv_max_port=20020\npasv_address=10.0.1.1\n\
         port_enable=NO\nconnect_from_port_20=NO\nseccomp_sandbox=NO\n\
         secure_chroot_dir={empty}\nxferlog_enable=YES\nvsftpd_log_file={log}\n\
         dual_log_enable=NO\nsyslog_enable=NO\nuse_localtime=NO\n",
        root = root.display(),
        empty = empty.display(),
        log = dir.path().join("vsftpd.log").display(),
    );
    let conf_path = dir.path().join("vsftpd.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = lab.origin().cmd("vsftpd", &[conf_path.to_str().unwrap()]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let _vsftpd = lab.origin().spawn(cmd).unwrap();
    wait_listening(
        &lab,
        SocketAddr::new(ORIGIN_V4.into(), 21),
        Duration::from_secs(10),
    );
    let agent = start_agent(&lab, APPS);

    let curl = |args: &[&str]| -> String {
        let mut all = vec!["-sS", "--max-time", "20", "--user", "anonymous:"];
        all.extend_from_slice(args);
        lab.client()
            .cmd("curl", &all)
            .output_ok()
            .unwrap_or_else(|e| panic!("curl {args:?}: {e:#}\n{}", agent.logs()))
    };
    // PASV: curl connects to the address in the 227 reply (the edge's), not to the
    // control connection's peer, so pasv_address is what makes it work.
    let pasv: &[&str] = &["--disable-epsv", "--no-ftp-skip-pasv-ip"];
    let epsv: &[&str] = &["--ftp-pasv"];
    for (mode, flags) in [("pasv", pasv), ("epsv", epsv)] {
        let with = |rest: &[&str]| -> Vec<String> {
            flags
                .iter()
                .chain(rest.iter())
                .map(|s| s.to_string())
                .collect()
        };
        let args = with(&["ftp://10.0.1.1/"]);
        let listing = curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            listing.contains("file.bin") && listing.contains("hello.txt"),
            "{mode}: listing {listing:?}"
        );
        let out = dir.path().join(format!("down-{mode}.bin"));
        let args = with(&["-o", out.to_str().unwrap(), "ftp://10.0.1.1/file.bin"]);
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            std::fs::read(&out).unwrap() == download,
            "{mode}: download differs"
        );

        let up = random_bytes(if mode == "pasv" { 21 } else { 22 }, 2 * 1024 * 1024 + 5);
        let local = dir.path().join(format!("up-{mode}.bin"));
        std::fs::write(&local, &up).unwrap();
        let url = format!("ftp://10.0.1.1/upload/up-{mode}.bin");
        let args = with(&["-T", local.to_str().unwrap(), &url]);
        curl(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stored = std::fs::read(upload.join(format!("up-{mode}.bin"))).unwrap();
        assert!(
            stored == up,
            "{mode}: upload differs ({} bytes stored)",
            stored.len()
        );
    }
    // Data connections went through the data-port app; nothing failed.
    let data = wait_events(&agent, "ftp-data", Duration::from_secs(10), |e| {
        e.iter().filter(|e| e.event() == "disconnect").count() >= 6
    });
    assert!(data.iter().all(|e| e.event() != "originError"), "{data:?}");
    assert!(data.iter().all(|e| {
        let port = e.num("ServerPort").unwrap_or(0);
        (20000..=20020).contains(&port) && e.num("OriginPort") == Some(port)
    }));
    let control = app_events(&agent, "ftp");
    assert!(control.iter().filter(|e| e.event() == "connect").count() >= 6);
    assert!(
        control.iter().all(|e| e.event() != "originError"),
        "{control:?}"
    );
}
