"""Text the data stages share: a record's language, normal form and hash (records), and the
words of a text (segment: jieba and nltk). Imports only core."""
