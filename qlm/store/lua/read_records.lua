-- read_records: read the same fields of many request records in one call (read-only).
--
-- KEYS[1 .. n]  req:{id}      the records to read
-- ARGV[1 ..]    fields        the field names to read from each
--
-- Returns one JSON array (text) with, per key in order, the array of its field
-- values; a missing record or field reads as false. Cheaper for the client than n
-- HMGET replies.

local rows = {}
for i, key in ipairs(KEYS) do
  rows[i] = redis.call('HMGET', key, unpack(ARGV))
end
return cjson.encode(rows)
