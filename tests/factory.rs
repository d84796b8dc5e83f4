//! The factories with real VMs: template clones, fallback to a direct boot
//! (and its refusal with no_fallback), and the cache factory filling,
//! refilling and surviving a template that disappears.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::{CheckRequest, GuestDetailsRequest};
use e2e::temp_path;
use factory::{
    CacheFactory, CreateOptions, DirectFactory, Factory, FactoryError, FallbackReason, GuestSpec,
    Machine, TemplateFactory, VmRequest, VmSource,
};

const CALL: Duration = Duration::from_secs(10);
/// Bounds a hang of the background builder; not a performance check.
const CACHE_DEADLINE: Duration = Duration::from_secs(120);
const MEM_MIB: u64 = 128;

/// A template of the test guest (1 vCPU) on /dev/shm, removed on drop.
struct TestTemplate(PathBuf);

impl TestTemplate {
    fn build(name: &str) -> TestTemplate {
        let dir = PathBuf::from("/dev/shm")
            .join(temp_path(name).file_name().expect("temp path has a name"));
        let _ = snapshot::template::remove(&dir);
        factory::create_template(&dir, &spec(""), &CreateOptions::default())
            .expect("create template");
        TestTemplate(dir)
    }
}

impl Drop for TestTemplate {
    fn drop(&mut self) {
        let _ = snapshot::template::remove(&self.0);
    }
}

fn spec(cmdline: &str) -> GuestSpec {
    GuestSpec {
        cmdline: cmdline.into(),
        ..GuestSpec::testguest(1, MEM_MIB)
    }
}

fn request(cmdline: &str) -> VmRequest {
    VmRequest::new(spec(cmdline)).expect("request")
}

fn assert_answers(vm: &mut factory::ReadyVm) {
    vm.agent()
        .check(&CheckRequest::default(), CALL)
        .expect("agent check");
    let d = vm
        .agent()
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .expect("guest details");
    assert_eq!(d.online_vcpus, 1);
}

#[test]
fn template_factory_clones_a_match_and_falls_back_on_another_cmdline() {
    let t = TestTemplate::build("factory-fallback");
    let f = TemplateFactory::open(&t.0, DirectFactory::default(), false);

    let mut same = f.get_vm(&request("")).expect("clone");
    assert_eq!(same.source, VmSource::Template);
    assert!(matches!(same.machine, Machine::Clone(_)));
    assert!(same.fallback.is_none());
    let names: Vec<&str> = same.steps.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["restore", "resume", "connect", "reseed", "clock", "check"]
    );
    assert_answers(&mut same);

    let mut other = f
        .get_vm(&request("factory_test=other"))
        .expect("direct boot");
    assert_eq!(other.source, VmSource::Direct);
    assert!(matches!(other.machine, Machine::Direct(_)));
    match &other.fallback {
        Some(FallbackReason::Mismatch(m)) => {
            assert_eq!(m.field, "cmdline");
            assert_eq!(m.template, "\"\"");
            assert_eq!(m.requested, "\"factory_test=other\"");
        }
        r => panic!("fallback reason {r:?}"),
    }
    assert_answers(&mut other);

    let strict = TemplateFactory::open(&t.0, DirectFactory::default(), true);
    match strict.get_vm(&request("factory_test=other")) {
        Err(FactoryError::Mismatch(m)) => assert_eq!(m.field, "cmdline"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(vm) => panic!("no_fallback served a {} VM", vm.source.name()),
    }
    // The matching request still clones under no_fallback.
    assert_eq!(
        strict.get_vm(&request("")).expect("clone").source,
        VmSource::Template
    );

    // A corrupt template (its state overwritten) is not cloned: fallback.
    let state = f.handle().expect("valid template").template().state_path();
    let mut bytes = std::fs::read(&state).expect("read state");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state, &bytes).expect("corrupt state");
    let corrupt = TemplateFactory::open(&t.0, DirectFactory::default(), false);
    assert!(corrupt.handle().is_err());
    let vm = corrupt.get_vm(&request("")).expect("direct boot");
    assert_eq!(vm.source, VmSource::Direct);
    assert!(
        matches!(&vm.fallback, Some(FallbackReason::Template(_))),
        "{:?}",
        vm.fallback
    );
}

#[test]
fn a_bigger_request_gets_a_grown_clone() {
    let t = TestTemplate::build("factory-grow");
    let f = TemplateFactory::open(&t.0, DirectFactory::default(), true);
    let req = VmRequest::new(GuestSpec::testguest(2, 512)).expect("request");
    let mut vm = f.get_vm(&req).expect("grown clone");
    assert_eq!(vm.source, VmSource::Template);
    assert!(vm.fallback.is_none());
    for step in ["add_vcpus", "add_memory", "online"] {
        assert!(vm.step(step).is_some(), "no {step} step: {:?}", vm.steps);
    }
    let d = vm
        .agent()
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .expect("guest details");
    assert_eq!(d.online_vcpus, 2);
    assert!(d.memory_bytes >= 512 << 20, "{}", d.memory_bytes);
}

#[test]
fn missing_template_falls_back_and_no_fallback_reports_it() {
    let dir = PathBuf::from("/dev/shm/minivmm-e2e-no-such-template");
    let f = TemplateFactory::open(&dir, DirectFactory::default(), false);
    assert!(f.handle().is_err());
    let mut vm = f.get_vm(&request("")).expect("direct boot");
    assert_eq!(vm.source, VmSource::Direct);
    assert!(
        matches!(&vm.fallback, Some(FallbackReason::Template(_))),
        "{:?}",
        vm.fallback
    );
    assert_answers(&mut vm);
    assert!(
        !dir.exists(),
        "the factory built a template on the hot path"
    );

    let strict = TemplateFactory::open(&dir, DirectFactory::default(), true);
    match strict.get_vm(&request("")) {
        Err(FactoryError::TemplateUnusable { dir: d, .. }) => assert_eq!(d, dir),
        Err(e) => panic!("unexpected error {e}"),
        Ok(vm) => panic!("no_fallback served a {} VM", vm.source.name()),
    }
}

#[test]
fn cache_of_four_serves_refills_and_survives_a_removed_template() {
    let t = TestTemplate::build("factory-cache");
    let source: Arc<dyn Factory> =
        Arc::new(TemplateFactory::open(&t.0, DirectFactory::default(), true));
    let fallback: Arc<dyn Factory> =
        Arc::new(TemplateFactory::open(&t.0, DirectFactory::default(), false));
    let cache = CacheFactory::new(source, fallback, request(""), 4);

    let (s, full) = cache.wait_status(CACHE_DEADLINE, |s| s.ready == 4);
    assert!(full, "cache never filled: {s:?}");

    let mut taken = Vec::new();
    for _ in 0..4 {
        let mut vm = cache.get_vm(&request("")).expect("take");
        assert_eq!(vm.source, VmSource::Cache);
        assert!(vm.step("take").is_some());
        assert_answers(&mut vm);
        taken.push(vm);
    }
    let (s, refilled) = cache.wait_status(CACHE_DEADLINE, |s| s.ready == 4 && s.built >= 8);
    assert!(refilled, "cache did not refill: {s:?}");
    assert_eq!(s.taken, 4);
    assert!(s.last_error.is_none(), "{s:?}");

    // A bigger request takes a cached clone and grows it.
    let mut grown = cache
        .get_vm(&VmRequest::new(GuestSpec::testguest(2, MEM_MIB + 128)).expect("request"))
        .expect("grown take");
    assert_eq!(grown.source, VmSource::Cache);
    assert!(grown.step("add_vcpus").is_some(), "{:?}", grown.steps);
    let d = grown
        .agent()
        .get_guest_details(&GuestDetailsRequest::default(), CALL)
        .expect("details");
    assert_eq!(d.online_vcpus, 2);
    assert!(
        d.memory_bytes >= (MEM_MIB + 128) << 20,
        "{}",
        d.memory_bytes
    );
    drop(grown);
    let (s, refilled) = cache.wait_status(CACHE_DEADLINE, |s| s.ready == 4 && s.built >= 9);
    assert!(refilled, "cache did not refill after the grown take: {s:?}");

    // A request the cache does not hold goes to the fallback factory.
    let other = cache.get_vm(&request("factory_test=other")).expect("other");
    assert_eq!(other.source, VmSource::Direct);
    drop(other);

    snapshot::template::remove(&t.0).expect("remove the template");
    let mut first = cache.get_vm(&request("")).expect("take after removal");
    assert_eq!(first.source, VmSource::Cache);
    assert_answers(&mut first);
    let (s, failed) = cache.wait_status(CACHE_DEADLINE, |s| s.last_error.is_some());
    assert!(
        failed,
        "the cache did not report the broken template: {s:?}"
    );
    let err = s.last_error.clone().unwrap_or_default();
    assert!(err.contains(&t.0.display().to_string()), "{err}");
    for _ in 0..3 {
        assert_eq!(
            cache.get_vm(&request("")).expect("take").source,
            VmSource::Cache
        );
    }
    // Empty cache, unusable template: the fallback boots directly.
    let mut direct = cache.get_vm(&request("")).expect("fallback");
    assert_eq!(direct.source, VmSource::Direct);
    assert!(
        matches!(&direct.fallback, Some(FallbackReason::Template(_))),
        "{:?}",
        direct.fallback
    );
    assert_answers(&mut direct);

    cache.close();
    let s = cache.status();
    assert!(s.closed && s.ready == 0, "{s:?}");
    assert!(matches!(
        cache.get_vm(&request("")),
        Err(FactoryError::Closed)
    ));
}
