//! A request's target and header fields in one allocation: the decoded path,
//! the raw query and every field's lowercased name and value are copied back
//! to back into one string, and found again by where each ends.
//!
//! A string per path, name and value cost a keep-alive `GET /health` four
//! allocations and a browser's dozen fields two dozen; this costs one (and a
//! second only past [`INLINE_FIELDS`] fields). It knows nothing of framing
//! or of which fields matter: the decoder decides that.

use smallvec::SmallVec;

use super::HttpError;

/// Fields whose ends are kept inline. A publisher sends three to five
/// (Host, Content-Type, Content-Length, Authorization, User-Agent); a
/// browser's dozen spill once, to one allocation for all of them.
const INLINE_FIELDS: usize = 8;

/// The text of a request head, without its method and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// The path, the query, then each field's name and value, back to back.
    text: String,
    path_end: u32,
    query_end: u32,
    /// Where each field's name and value end in `text`. A name starts where
    /// the field before it (or the query) ends.
    fields: SmallVec<[FieldEnds; INLINE_FIELDS]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FieldEnds {
    name: u32,
    value: u32,
}

impl Head {
    /// A head holding `path` and `query`, with room for `field_bytes` more
    /// bytes of names and values in `fields` fields.
    pub(super) fn new(
        path: &str,
        query: &str,
        field_bytes: usize,
        fields: usize,
    ) -> Result<Self, HttpError> {
        let mut text = String::with_capacity(path.len() + query.len() + field_bytes);
        text.push_str(path);
        let path_end = offset(&text)?;
        text.push_str(query);
        let query_end = offset(&text)?;
        Ok(Self {
            text,
            path_end,
            query_end,
            fields: SmallVec::with_capacity(fields),
        })
    }

    /// Appends a field, its name lowercased; returns the name as stored.
    pub(super) fn push_field(&mut self, name: &str, value: &str) -> Result<&str, HttpError> {
        let start = self.text.len();
        self.text.push_str(name);
        self.text[start..].make_ascii_lowercase();
        let name_end = offset(&self.text)?;
        self.text.push_str(value);
        let ends = FieldEnds {
            name: name_end,
            value: offset(&self.text)?,
        };
        self.fields.push(ends);
        Ok(&self.text[start..name_end as usize])
    }

    /// The percent-decoded path.
    pub(super) fn path(&self) -> &str {
        &self.text[..self.path_end as usize]
    }

    /// The raw query, `""` if none.
    pub(super) fn query(&self) -> &str {
        &self.text[self.path_end as usize..self.query_end as usize]
    }

    /// Every field as (lowercased name, value), in order.
    pub(super) fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut start = self.query_end as usize;
        self.fields.iter().map(move |ends| {
            let (name_end, value_end) = (ends.name as usize, ends.value as usize);
            debug_assert!(start <= name_end && name_end <= value_end);
            let field = (&self.text[start..name_end], &self.text[name_end..value_end]);
            start = value_end;
            field
        })
    }

    /// Bytes it holds on the heap.
    pub(super) fn heap_bytes(&self) -> usize {
        let ends = if self.fields.spilled() {
            self.fields.capacity() * std::mem::size_of::<FieldEnds>()
        } else {
            0
        };
        self.text.capacity() + ends
    }
}

/// The end of `text` as an offset. A head is bounded by `max_header_bytes`
/// (lossy decoding at most triples it), so this fails only for a limit
/// configured past 1 GiB; the answer is then the one for a head too large.
fn offset(text: &str) -> Result<u32, HttpError> {
    u32::try_from(text.len()).map_err(|_| HttpError::HeadersTooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_query_and_fields_come_back_as_pushed_with_names_lowercased() {
        let mut head = Head::new("/a b", "x=1", 16, 2).unwrap();
        assert_eq!(head.push_field("Host", "h:1").unwrap(), "host");
        assert_eq!(head.push_field("X-Thing", "").unwrap(), "x-thing");
        assert_eq!(head.path(), "/a b");
        assert_eq!(head.query(), "x=1");
        let fields: Vec<_> = head.fields().collect();
        assert_eq!(fields, [("host", "h:1"), ("x-thing", "")]);
    }

    #[test]
    fn a_head_past_the_inline_fields_keeps_them_all_and_counts_the_spill() {
        let mut head = Head::new("/", "", 0, 0).unwrap();
        let inline = head.heap_bytes();
        for i in 0..INLINE_FIELDS + 1 {
            head.push_field(&format!("N{i}"), &i.to_string()).unwrap();
        }
        assert_eq!(head.fields().count(), INLINE_FIELDS + 1);
        assert_eq!(head.fields().last(), Some(("n8", "8")));
        assert!(head.heap_bytes() >= inline + (INLINE_FIELDS + 1) * 8);
    }
}
