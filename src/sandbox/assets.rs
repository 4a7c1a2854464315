//! Static parts of the sandbox's pages (the status page and the authorize page), shared by
//! `page` and `platform` so neither imports the other.

/// The stylesheet of every sandbox page.
pub(crate) const CSS: &str = "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:24px auto;color:#1f2329;background:#f5f6f7}\
h1{font-size:22px}h2{font-size:17px;margin:18px 0 6px}.card{background:#fff;border:1px solid #dee0e3;border-radius:8px;padding:12px 16px;margin:8px 0}\
.title{font-weight:600;margin-bottom:6px}.muted{color:#8f959e;font-size:12px}button,.btn{display:inline-block;border:1px solid #3370ff;background:#3370ff;color:#fff;border-radius:6px;padding:5px 12px;margin:4px 6px 0 0;text-decoration:none;font-size:14px;cursor:pointer}\
.no{background:#fff;color:#f54a45;border-color:#f54a45}.status{font-size:14px;margin:6px 0}.token-stored{color:#2ea121}.token-none{color:#8f959e}.ok{background:#34c724;border-color:#34c724}form{display:inline}code{background:#eff0f1;padding:1px 4px;border-radius:4px}</style>";
