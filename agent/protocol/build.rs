//! Generates the protocol's Rust code from `proto/*.proto` at build time.
//!
//! `protox` compiles the .proto files in pure Rust (no system `protoc`), and
//! `prost-build` turns the descriptors into `prost` structs. For each service,
//! [`TtrpcServiceGenerator`] adds the server trait, its dispatcher and the typed
//! host-client methods, so the .proto stays the one place an RPC is declared.
//! The output only uses `::prost::alloc` and `::core`, so it builds for the
//! no_std guest; the client methods are behind `#[cfg(feature = "std")]`.

use std::error::Error;
use std::fmt::Write as _;

use prost_build::{Service, ServiceGenerator};

const PROTOS: [&str; 2] = ["proto/agent.proto", "proto/ttrpc.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    prost_build::Config::new()
        // Keep any future map field no_std-friendly.
        .btree_map(["."])
        .service_generator(Box::new(TtrpcServiceGenerator))
        .compile_fds(descriptors)?;
    Ok(())
}

/// Emits, per service: its wire name, method-name constants, a trait with one
/// method per RPC (default: UNIMPLEMENTED), a dispatcher and client methods.
struct TtrpcServiceGenerator;

impl ServiceGenerator for TtrpcServiceGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        if let Some(method) = service
            .methods
            .iter()
            .find(|m| m.client_streaming || m.server_streaming)
        {
            panic!(
                "{}.{}: streaming RPCs are not supported by agent-protocol",
                service.proto_name, method.proto_name
            );
        }
        let wire_name = format!("{}.{}", service.package, service.proto_name);
        let snake = to_snake_case(&service.name);
        let name_const = format!("{}_NAME", snake.to_uppercase());
        let trait_name = &service.name;

        // Writing to a String cannot fail; unwraps below are on fmt::Write.
        let b = buf;
        writeln!(
            b,
            "/// Fully qualified name of `{trait_name}` on the ttrpc wire.\n\
             pub const {name_const}: &str = \"{wire_name}\";"
        )
        .unwrap();

        writeln!(
            b,
            "/// Method names of `{trait_name}` on the ttrpc wire.\npub mod {snake}_method {{"
        )
        .unwrap();
        for method in &service.methods {
            writeln!(
                b,
                "/// `{0}`.\npub const {1}: &str = \"{0}\";",
                method.proto_name,
                method.name.to_uppercase()
            )
            .unwrap();
        }
        b.push_str("}\n");

        service.comments.append_with_indent(0, b);
        writeln!(
            b,
            "///\n/// One method per RPC. Each defaults to answering UNIMPLEMENTED, so a \
             server\n/// implements what it supports and new RPCs do not break it.\n\
             pub trait {trait_name} {{"
        )
        .unwrap();
        for method in &service.methods {
            method.comments.append_with_indent(1, b);
            writeln!(
                b,
                "fn {name}(&mut self, request: {input}) \
                 -> ::core::result::Result<{output}, crate::Status> {{\n\
                 let _ = request;\n\
                 ::core::result::Result::Err(crate::Status::unimplemented_method({name_const}, \"{proto}\"))\n}}",
                name = method.name,
                input = method.input_type,
                output = method.output_type,
                proto = method.proto_name,
            )
            .unwrap();
        }
        b.push_str("}\n");

        writeln!(
            b,
            "/// Runs one `{trait_name}` call: decodes `payload` as the request of \
             `method`,\n/// calls `service` and encodes its reply. Unknown methods \
             answer UNIMPLEMENTED,\n/// undecodable payloads INVALID_ARGUMENT.\n\
             pub fn dispatch_{snake}<S: {trait_name} + ?Sized>(service: &mut S, method: &str, \
             payload: &[u8]) -> ::core::result::Result<::prost::alloc::vec::Vec<u8>, crate::Status> {{\n\
             match method {{"
        )
        .unwrap();
        for method in &service.methods {
            writeln!(
                b,
                "\"{proto}\" => {{\n\
                 let request = crate::server::decode_request::<{input}>({name_const}, method, payload)?;\n\
                 service.{name}(request).map(|reply| ::prost::Message::encode_to_vec(&reply))\n}}",
                proto = method.proto_name,
                input = method.input_type,
                name = method.name,
            )
            .unwrap();
        }
        writeln!(
            b,
            "_ => ::core::result::Result::Err(crate::Status::unimplemented_method({name_const}, method)),\n}}\n}}"
        )
        .unwrap();

        b.push_str("#[cfg(feature = \"std\")]\nimpl crate::client::AgentClient {\n");
        for method in &service.methods {
            method.comments.append_with_indent(1, b);
            writeln!(
                b,
                "///\n/// Calls `{wire_name}/{proto}`; `deadline` bounds the whole call.\n\
                 pub fn {name}(&mut self, request: &{input}, deadline: ::std::time::Duration) \
                 -> ::core::result::Result<{output}, crate::client::ClientError> {{\n\
                 self.call({name_const}, \"{proto}\", request, deadline)\n}}",
                proto = method.proto_name,
                name = method.name,
                input = method.input_type,
                output = method.output_type,
            )
            .unwrap();
        }
        b.push_str("}\n");
    }
}

/// `AgentService` -> `agent_service`.
fn to_snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
