//! The `#[weir_sdk::transform]` attribute. It checks the function's shape and reports misuse
//! as a compile error pointing at the offending code (never a panic), then generates the
//! `batch` world's exports around the function.

use proc_macro::TokenStream;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{
    Error, FnArg, ItemFn, Meta, Path, ReturnType, Token, parse_macro_input, punctuated::Punctuated,
};

/// Turns `fn name(record: Record) -> Result<T, TransformError>` into a Weir plugin.
/// `T` is `Output`, `Option<Output>` or `Vec<Output>`. Optional: `init = path::to::check`,
/// a `fn(&weir_sdk::Config) -> Result<(), String>` run once per instance.
#[proc_macro_attribute]
pub fn transform(attr: TokenStream, item: TokenStream) -> TokenStream {
    let args = parse_macro_input!(attr with Punctuated::<Meta, Token![,]>::parse_terminated);
    let func = parse_macro_input!(item as ItemFn);
    let original = quote!(#func);
    match expand(args, func) {
        Ok(tokens) => tokens.into(),
        // Keep the function, so the only error shown is ours.
        Err(e) => {
            let mut tokens = e.to_compile_error();
            tokens.extend(original);
            tokens.into()
        }
    }
}

fn expand(
    args: Punctuated<Meta, Token![,]>,
    func: ItemFn,
) -> syn::Result<proc_macro2::TokenStream> {
    let mut init: Option<Path> = None;
    for arg in args {
        match arg {
            Meta::NameValue(nv) if nv.path.is_ident("init") => match nv.value {
                syn::Expr::Path(p) => init = Some(p.path),
                other => {
                    return Err(Error::new(
                        other.span(),
                        "`init` takes a function path, e.g. `init = check_config`",
                    ));
                }
            },
            other => {
                return Err(Error::new(
                    other.span(),
                    "unknown argument: #[weir_sdk::transform] takes only `init = <function>`",
                ));
            }
        }
    }
    let sig = &func.sig;
    if let Some(asyncness) = &sig.asyncness {
        return Err(Error::new(
            asyncness.span(),
            "a transform function cannot be `async`",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(Error::new(
            sig.generics.span(),
            "a transform function cannot be generic",
        ));
    }
    if sig.inputs.len() != 1 {
        let span = if sig.inputs.is_empty() {
            sig.paren_token.span.join()
        } else {
            sig.inputs.span()
        };
        return Err(Error::new(
            span,
            format!(
                "a transform function takes exactly one argument, `record: weir_sdk::Record` (found {})",
                sig.inputs.len()
            ),
        ));
    }
    if let Some(FnArg::Receiver(receiver)) = sig.inputs.first() {
        return Err(Error::new(
            receiver.span(),
            "a transform function cannot take `self`",
        ));
    }
    let ReturnType::Type(_, ret) = &sig.output else {
        return Err(Error::new(
            sig.ident.span(),
            "a transform function must return `Result<T, weir_sdk::TransformError>` \
             where T is Output, Option<Output> or Vec<Output>",
        ));
    };
    let name = &sig.ident;
    let init = match init {
        Some(path) => {
            quote_spanned!(path.span()=> ::core::option::Option::Some(#path as fn(&::weir_sdk::Config) -> ::core::result::Result<(), ::std::string::String>))
        }
        None => quote!(::core::option::Option::None),
    };
    // Spanned on the user's types, so a wrong type is reported where it was written.
    let fn_ptr = quote_spanned!(ret.span()=> #name as fn(::weir_sdk::Record) -> #ret);
    Ok(quote! {
        #func

        #[doc(hidden)]
        struct __WeirTransform;

        impl ::weir_sdk::__private::Guest for __WeirTransform {
            fn init(config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>) -> ::core::result::Result<(), ::std::string::String> {
                ::weir_sdk::__private::init(config, #init)
            }

            fn transform_batch(
                records: ::std::vec::Vec<::weir_sdk::Record>,
            ) -> ::std::vec::Vec<::core::result::Result<::std::vec::Vec<::weir_sdk::Output>, ::weir_sdk::TransformError>> {
                ::weir_sdk::__private::batch(records, #fn_ptr)
            }
        }

        ::weir_sdk::bindings::__export_batch!(__WeirTransform with_types_in ::weir_sdk::bindings);
    })
}
