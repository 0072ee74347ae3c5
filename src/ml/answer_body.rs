//! The ML API's answers read with a bound: an answer that never ends, or
//! an error page, costs at most the bound.

/// The most bytes of an error answer (4xx, 5xx) read: it is only quoted.
pub(super) const ERROR_BODY_MAX_BYTES: usize = 1024;

/// An answer's body, read up to a bound.
pub(super) enum Body {
    Whole(Vec<u8>),
    /// The first `bound` bytes of a longer body; the rest was never read.
    Cut(Vec<u8>),
}

/// An error answer's body as text, for a reason: what was read of it.
pub(super) fn quoted(body: Result<Body, reqwest::Error>) -> String {
    match body {
        Ok(Body::Whole(bytes) | Body::Cut(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// Reads at most `bound` bytes of the body, chunk by chunk, so that an
/// answer that never ends costs at most the bound (and one chunk).
pub(super) async fn read_bounded(mut response: reqwest::Response, bound: usize) -> Result<Body, reqwest::Error> {
    let mut body = Vec::with_capacity(response.content_length().map_or(0, |n| n.min(bound as u64) as usize));
    while let Some(chunk) = response.chunk().await? {
        let room = bound - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok(Body::Cut(body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Body::Whole(body))
}

pub(super) fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}
